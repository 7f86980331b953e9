-- The Realtime API's input noise reduction per agent: near_field (a handset held to the ear,
-- what phone callers use), far_field (a speakerphone or a room) or off. Existing agents get
-- near_field, the default for new ones.
ALTER TABLE agents ADD COLUMN noise_reduction TEXT NOT NULL DEFAULT 'near_field'
    CHECK (noise_reduction IN ('near_field', 'far_field', 'off'));
