-- Call recordings (stereo WAV in the R2 bucket RECORDINGS): whether an agent's calls are
-- recorded, and where each call's recording is, how long and how large.
ALTER TABLE agents ADD COLUMN record_calls INTEGER NOT NULL DEFAULT 1 CHECK (record_calls IN (0, 1));
ALTER TABLE calls ADD COLUMN recording_key TEXT;
ALTER TABLE calls ADD COLUMN recording_duration_ms INTEGER;
ALTER TABLE calls ADD COLUMN recording_bytes INTEGER;
