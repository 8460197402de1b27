-- Why a generation's model ended (SPEC §7.3): `stop` (the model finished), `length` (maxTokens or the
-- 200,000-character message bound reached); null for every generation that did not succeed.
ALTER TABLE generations
    ADD COLUMN finish_reason text CHECK (finish_reason IN ('stop', 'length')),
    ADD CONSTRAINT generations_finish_reason_only_succeeded
        CHECK (finish_reason IS NULL OR status = 'succeeded');
