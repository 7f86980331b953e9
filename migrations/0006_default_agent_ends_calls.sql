-- The seeded default agent can end a call: with the built-in `end_call` tool it says goodbye
-- and hangs up once the goodbye has played, where before the line stayed open until the
-- caller hung up or the idle check-in and goodbye (a minute of silence by default). Only the
-- seed as it was shipped changes: never edited (its `updated_at` still its `created_at`,
-- which every change through the admin API moves) and without tools; an agent someone set
-- up keeps what they gave it.
UPDATE agents SET tools = '[{"type":"end_call"}]'
 WHERE id = 'default' AND tools = '[]' AND updated_at = created_at;
