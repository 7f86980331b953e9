-- Key for the signature on webhook tool requests (X-Bridge-Signature). Write-only in the
-- admin API: it is stored here and never returned.
ALTER TABLE agents ADD COLUMN tool_secret TEXT;
