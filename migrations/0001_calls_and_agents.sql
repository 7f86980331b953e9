-- Agents, the numbers they answer, and everything each call leaves behind.
-- Times are ISO 8601 UTC text (e.g. 2026-11-22T01:32:02.123Z) so they sort and read well.

CREATE TABLE agents (
    id                     TEXT PRIMARY KEY,
    name                   TEXT NOT NULL,
    instructions           TEXT NOT NULL,
    -- What the first response should say or do (its instructions).
    greeting               TEXT NOT NULL,
    voice                  TEXT NOT NULL DEFAULT 'marin',
    model                  TEXT NOT NULL DEFAULT 'gpt-realtime',
    language               TEXT NOT NULL DEFAULT 'ja',
    transcription_model    TEXT NOT NULL DEFAULT 'gpt-4o-transcribe',
    turn_detection_type    TEXT NOT NULL DEFAULT 'server_vad',
    vad_threshold          REAL NOT NULL DEFAULT 0.5,
    vad_silence_ms         INTEGER NOT NULL DEFAULT 500,
    vad_prefix_padding_ms  INTEGER NOT NULL DEFAULT 300,
    -- JSON array of Realtime function tool definitions.
    tools                  TEXT NOT NULL DEFAULT '[]',
    transfer_number        TEXT,
    max_call_seconds       INTEGER NOT NULL DEFAULT 1800,
    -- Exactly one agent answers numbers that have no assignment.
    is_default             INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_at             TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at             TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE UNIQUE INDEX agents_single_default ON agents (is_default) WHERE is_default = 1;

-- Which agent answers which called number (E.164).
CREATE TABLE phone_numbers (
    number      TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL REFERENCES agents (id),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX phone_numbers_agent ON phone_numbers (agent_id);

CREATE TABLE calls (
    call_sid            TEXT PRIMARY KEY,
    account_sid         TEXT NOT NULL DEFAULT '',
    from_number         TEXT NOT NULL DEFAULT '',
    to_number           TEXT NOT NULL DEFAULT '',
    agent_id            TEXT,
    direction           TEXT NOT NULL DEFAULT '',
    -- Twilio's CallStatus values.
    status              TEXT NOT NULL DEFAULT 'ringing' CHECK (status IN
                          ('ringing', 'in-progress', 'completed', 'failed', 'busy', 'no-answer', 'canceled')),
    stream_sid          TEXT,
    openai_session_id   TEXT,
    started_at          TEXT NOT NULL,
    connected_at        TEXT,
    ended_at            TEXT,
    duration_ms         INTEGER,
    end_reason          TEXT,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    total_tokens        INTEGER NOT NULL DEFAULT 0,
    -- From the stream start to the first agent audio sent to the caller.
    first_audio_ms      INTEGER,
    barge_ins           INTEGER NOT NULL DEFAULT 0,
    -- Twilio's CallDuration (seconds) from the final status callback.
    twilio_duration_s   INTEGER
);
CREATE INDEX calls_started ON calls (started_at DESC);
CREATE INDEX calls_status ON calls (status, started_at DESC);
CREATE INDEX calls_to ON calls (to_number, started_at DESC);
CREATE INDEX calls_from ON calls (from_number, started_at DESC);

CREATE TABLE transcript_entries (
    call_sid     TEXT NOT NULL REFERENCES calls (call_sid),
    -- Position in the conversation (not arrival order).
    seq          INTEGER NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('caller', 'agent')),
    text         TEXT NOT NULL,
    -- Milliseconds from the stream start to when this turn began.
    offset_ms    INTEGER NOT NULL,
    item_id      TEXT,
    -- An agent turn cut by a barge-in keeps what was heard before the cut.
    interrupted  INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    PRIMARY KEY (call_sid, seq)
);

CREATE TABLE call_events (
    call_sid  TEXT NOT NULL REFERENCES calls (call_sid),
    seq       INTEGER NOT NULL,
    at        TEXT NOT NULL,
    type      TEXT NOT NULL,
    detail    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (call_sid, seq)
);

-- A working Japanese default agent, so a fresh install answers calls.
INSERT INTO agents (id, name, instructions, greeting, is_default) VALUES (
    'default',
    '標準受付',
    'あなたは電話の受付を担当するAIアシスタントです。日本語の丁寧な敬語（です・ます調）で、落ち着いた明るい声で話してください。電話での会話ですので、一度の発話は一、二文に短くまとめ、記号や箇条書きは使わず、耳で聞いて分かりやすい言葉を選んでください。お客様のご用件を丁寧に伺い、必要に応じてお名前、ご連絡先、ご用件を確認し、数字や固有名詞は復唱してください。聞き取れなかったときは推測せず聞き返してください。その場で判断できないことは、担当者から折り返しご連絡する旨をお伝えしてください。AIかどうかを尋ねられたら、正直にAIアシスタントであるとお答えください。',
    '「お電話ありがとうございます。」と丁寧にご挨拶し、AIアシスタントが応対していることを一言お伝えしてから、「本日はどのようなご用件でしょうか。」とご用件を伺ってください。二文程度の短いご挨拶にしてください。',
    1
);
