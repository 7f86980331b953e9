// The benchmark's floor: the least a Twilio <-> OpenAI Realtime bridge on workerd can do.
// Voice webhook -> TwiML with <Connect><Stream>; stream -> Durable Object; Twilio `media`
// -> `input_audio_buffer.append`; `response.output_audio.delta` -> Twilio `media`. Nothing
// else: no signature checks, no marks, no barge-in, no transcript, no records.

const STREAM_PREFIX = '/api/twilio/media-stream/';

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (url.pathname === '/healthz') return new Response('ok');
    if (request.method === 'POST' && url.pathname === '/api/twilio/voice') {
      const form = await request.formData();
      const sid = String(form.get('CallSid') ?? 'CAunknown').replace(/[^A-Za-z0-9]/g, '');
      const ws = `${url.protocol === 'https:' ? 'wss' : 'ws'}://${url.host}${STREAM_PREFIX}${sid}`;
      const twiml = `<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="${ws}"/></Connect></Response>`;
      return new Response(twiml, { headers: { 'content-type': 'text/xml' } });
    }
    if (url.pathname.startsWith(STREAM_PREFIX) && request.headers.get('Upgrade') === 'websocket') {
      if (env.FLOOR_USE_DO === 'false') return relay(env, (p) => ctx.waitUntil(p));
      const id = env.RELAY.idFromName(url.pathname.slice(STREAM_PREFIX.length));
      return env.RELAY.get(id).fetch(request);
    }
    return new Response('Not Found', { status: 404 });
  },
};

export class Relay {
  constructor(state, env) {
    this.env = env;
  }

  async fetch() {
    return relay(this.env, () => {});
  }
}

function relay(env, keepAlive) {
  const [client, twilio] = Object.values(new WebSocketPair());
  twilio.accept();
  let upstream = null;
  let streamSid = null;
  const pending = [];
  const end = () => {
    try { twilio.close(1000, 'done'); } catch {}
    try { upstream?.close(1000, 'done'); } catch {}
  };
  // Listeners before any await: workerd drops messages that arrive with no listener.
  twilio.addEventListener('message', (ev) => {
    const f = JSON.parse(ev.data);
    if (f.event === 'media') {
      const msg = `{"type":"input_audio_buffer.append","audio":"${f.media.payload}"}`;
      if (upstream) upstream.send(msg);
      else pending.push(msg);
    } else if (f.event === 'start') {
      streamSid = f.start.streamSid;
    } else if (f.event === 'stop') {
      end();
    }
  });
  twilio.addEventListener('close', end);
  twilio.addEventListener('error', end);

  keepAlive(
    (async () => {
      const target = env.OPENAI_REALTIME_URL.replace(/^ws/, 'http') + '?model=gpt-realtime';
      const resp = await fetch(target, {
        headers: { Upgrade: 'websocket', Authorization: `Bearer ${env.OPENAI_API_KEY}` },
      });
      const ws = resp.webSocket;
      if (!ws) return end();
      ws.accept();
      ws.addEventListener('message', (ev) => {
        const e = JSON.parse(ev.data);
        if (e.type === 'response.output_audio.delta' && streamSid) {
          twilio.send(`{"event":"media","streamSid":"${streamSid}","media":{"payload":"${e.delta}"}}`);
        }
      });
      ws.addEventListener('close', end);
      ws.addEventListener('error', end);
      ws.send(JSON.stringify({
        type: 'session.update',
        session: {
          type: 'realtime',
          output_modalities: ['audio'],
          audio: {
            input: { format: { type: 'audio/pcmu' }, turn_detection: { type: 'server_vad' } },
            output: { format: { type: 'audio/pcmu' } },
          },
        },
      }));
      upstream = ws;
      for (const m of pending.splice(0)) ws.send(m);
    })().catch(end),
  );
  return new Response(null, { status: 101, webSocket: client });
}
