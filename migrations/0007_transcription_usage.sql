-- What transcribing the caller's speech cost, apart from the Realtime session's own tokens
-- (input_tokens / output_tokens / total_tokens): OpenAI bills the transcription model
-- separately, by tokens (gpt-4o-transcribe, gpt-4o-mini-transcribe) or by the length of the
-- audio (whisper-1). Summed over the call's transcriptions.
ALTER TABLE calls ADD COLUMN transcription_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN transcription_output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN transcription_audio_ms INTEGER NOT NULL DEFAULT 0;
