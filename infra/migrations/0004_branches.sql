-- Branches (SPEC §7.1): a chat's messages form a tree. Each message has a parent (null at a root of a
-- branch); the chat shows the path from a root to its active leaf.

-- No ON DELETE action: messages go only with their chat, all in one statement. A self-referencing
-- cascade would recurse once per message of a long branch.
ALTER TABLE messages ADD COLUMN parent_id uuid REFERENCES messages (id);
-- True once another message shares its parent and role (set on all of them by the insert that makes the
-- second one): only those look their siblings up when a path is listed.
ALTER TABLE messages ADD COLUMN forked boolean NOT NULL DEFAULT false;
-- The last message of the branch the chat shows (null while the chat is empty).
ALTER TABLE chats ADD COLUMN active_leaf_id uuid REFERENCES messages (id) ON DELETE SET NULL;
-- The message a generation's answer follows: the new user message, the parent of a regenerated answer,
-- or the active leaf of a create without content. No foreign key: the generation goes with its chat,
-- and so do its messages (a key would need an index on generations for every message a chat delete
-- removes).
ALTER TABLE generations ADD COLUMN parent_message_id uuid;

-- Chats written before branches read as one path: each message's parent is the one before it in the
-- chat's creation order (seq: created_at ties within a transaction, and ids are random), and the active
-- leaf is the last message. A generation still in flight answers the chat's last message.
UPDATE messages m SET parent_id = o.previous
FROM (SELECT id, lag(id) OVER (PARTITION BY chat_id ORDER BY seq) AS previous FROM messages) o
WHERE m.id = o.id AND o.previous IS NOT NULL AND m.parent_id IS NULL;

UPDATE chats c SET active_leaf_id = l.id
FROM (SELECT DISTINCT ON (chat_id) chat_id, id FROM messages ORDER BY chat_id, seq DESC) l
WHERE c.id = l.chat_id AND c.active_leaf_id IS NULL;

UPDATE generations g SET parent_message_id = c.active_leaf_id
FROM chats c
WHERE c.id = g.chat_id AND g.status IN ('queued', 'streaming') AND g.parent_message_id IS NULL;

-- siblingIds (same parent and role, oldest first) and the walk down to a subtree's newest leaf, as
-- index-only scans; also the lookup behind the parent_id key when a chat's messages are deleted.
CREATE INDEX messages_parent_idx ON messages (parent_id, role, seq) INCLUDE (id);
-- The roots of a chat (parent_id is null: the index above cannot tell one chat's from another's).
CREATE INDEX messages_roots_idx ON messages (chat_id, role, seq) INCLUDE (id) WHERE parent_id IS NULL;
-- The ON DELETE SET NULL of active_leaf_id looks chats up by it for every message a chat delete removes.
CREATE INDEX chats_active_leaf_idx ON chats (active_leaf_id);
