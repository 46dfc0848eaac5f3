-- The line of a blocking file where reading it failed (feed.BadFile.line), beside its
-- key and reason: the status page shows it on its own so the person on call can open
-- the file there. NULL when the failure has no line (an empty file, the database
-- refusing a value) and whenever the dataset is not blocked. Nullable and without a
-- default, so adding it rewrites nothing.
ALTER TABLE tickets.import_meta ADD COLUMN IF NOT EXISTS blocked_line integer;
