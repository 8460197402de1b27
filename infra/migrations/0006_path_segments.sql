-- Paths by segments (SPEC §7.1): listing a branch walked up its messages one parent at a time, one index
-- lookup per message, even in a chat that never branched. A segment is a run of messages each of which
-- is its parent's first child; it is named by its first message (a root, or a message added beside an
-- older child of its parent). Every message of a segment up to a given one is on that message's path, so
-- a path is the segments it crosses (one per fork along it), each cut at the fork, read by range scans.
ALTER TABLE messages ADD COLUMN segment_id uuid;

-- Existing trees: a root starts a segment; the oldest child of a message continues its parent's segment;
-- any other child starts its own.
WITH RECURSIVE walk AS (
    SELECT id, id AS segment_id FROM messages WHERE parent_id IS NULL
    UNION ALL
    SELECT m.id,
           CASE WHEN m.seq = (SELECT min(s.seq) FROM messages s WHERE s.parent_id = m.parent_id)
                THEN walk.segment_id ELSE m.id END
    FROM walk JOIN messages m ON m.parent_id = walk.id
)
UPDATE messages m SET segment_id = walk.segment_id FROM walk WHERE m.id = walk.id;

ALTER TABLE messages ALTER COLUMN segment_id SET NOT NULL;
-- A segment's messages in order, up to the fork: the page of a path, and the newest of it for a prompt.
CREATE INDEX messages_segment_idx ON messages (segment_id, seq) INCLUDE (id);
