-- The particulars of why a call ended, beside the short end_reason label: the close code,
-- the HTTP status of a refused upgrade, the error code, and so on.
ALTER TABLE calls ADD COLUMN end_detail TEXT;
