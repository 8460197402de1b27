-- A check that ends a transaction from inside a statement. A create sends its statements in one round trip
-- (a pipeline: lock the chat, check it and the message it branches from, insert the prompt, the generation
-- and its audit event); the first statement refuses with this when a check fails, so the ones after it are
-- skipped and everything is rolled back, instead of a round trip per check. The refusal's code (which
-- check failed) is the error's constraint name; SQLSTATE P0001, raise_exception.
CREATE FUNCTION minichat_refuse(code text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF code IS NOT NULL THEN
        RAISE EXCEPTION 'refused: %', code USING CONSTRAINT = code;
    END IF;
    RETURN true;
END
$$;
