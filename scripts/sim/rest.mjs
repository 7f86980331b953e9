// Twilio's REST API as the call simulator plays it: the update of a live call (protocol.md
// C3), which the Worker sends when the agent ends the call itself (end_call, the idle
// goodbye: `Status=completed`) or hands it to a person (`Twiml=<Response>…<Dial>…`).
//
//   POST {PREFIX}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json
//   Authorization: Basic base64(user:TWILIO_AUTH_TOKEN)
//
// The user is TWILIO_ACCOUNT_SID when the Worker has one, else the call's own AccountSid.
// Answered like Twilio: 200 with the Call resource (abridged), 401 (code 20003) for wrong
// credentials, 404 (20404) for a call it does not know, 405 for another method, 400 (21220)
// for new TwiML once the call has ended. The Worker reaches it when started with
// TWILIO_API_BASE_URL=http://127.0.0.1:8788/twilio (`npm run dev:offline` does that).
//
// Events: `update` { accountSid, callSid, form: [[name, value]…], status, twiml } for each
// accepted update; `refused` { status, code, message, path } for each one answered with an
// error.

import { EventEmitter } from 'node:events';

/** Where the REST API is served on the simulator's port. */
export const REST_PREFIX = '/twilio';

const CALL_PATH = /^\/2010-04-01\/Accounts\/([^/]+)\/Calls\/([^/]+)\.json$/;

/** `{ accountSid, callSid }` of a Call resource path (after the prefix), or null. */
export function callPath(path) {
  const m = CALL_PATH.exec(path);
  return m ? { accountSid: decodeURIComponent(m[1]), callSid: decodeURIComponent(m[2]) } : null;
}

/** `[user, password]` of a Basic Authorization header, or null. */
export function basicAuth(header) {
  const m = /^Basic\s+(\S+)$/i.exec(header ?? '');
  if (!m) return null;
  const text = Buffer.from(m[1], 'base64').toString('utf8');
  const at = text.indexOf(':');
  return at < 0 ? null : [text.slice(0, at), text.slice(at + 1)];
}

function rfc2822(d = new Date()) {
  return d.toUTCString().replace('GMT', '+0000');
}

export class TwilioRest extends EventEmitter {
  /**
   * `authToken`: the Worker's TWILIO_AUTH_TOKEN (the Basic password). `accountSid`: its
   * TWILIO_ACCOUNT_SID when known (accepted as the user besides the call's AccountSid).
   * `anyCall`: accept updates for every call (the stand-in run alone), not only the calls
   * given to `expect`.
   */
  constructor({ authToken, accountSid = null, anyCall = false }) {
    super();
    this.authToken = authToken;
    this.accountSid = accountSid || null;
    this.anyCall = anyCall;
    this.calls = new Map(); // callSid -> { accountSid, status, started }
  }

  /** The simulated call, now in progress. */
  expect({ accountSid, callSid }) {
    this.calls.set(callSid, { accountSid, status: 'in-progress', started: Date.now() });
  }

  /** Handles `req` when its path is under REST_PREFIX; false when it is not. */
  handle(req, res) {
    const url = new URL(req.url, 'http://x');
    if (url.pathname !== REST_PREFIX && !url.pathname.startsWith(`${REST_PREFIX}/`)) return false;
    const path = url.pathname.slice(REST_PREFIX.length);
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => this.#answer(req, res, path, Buffer.concat(chunks).toString('utf8')));
    return true;
  }

  #error(res, status, code, message, path) {
    this.emit('refused', { status, code, message, path });
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ code, message, more_info: `https://www.twilio.com/docs/errors/${code}`, status }));
  }

  #answer(req, res, path, body) {
    const ids = callPath(path);
    if (!ids) return this.#error(res, 404, 20404, `The requested resource ${path} was not found`, path);
    if (req.method !== 'POST') return this.#error(res, 405, 20004, 'Method not allowed', path);
    const cred = basicAuth(req.headers.authorization);
    const users = [ids.accountSid, this.accountSid].filter(Boolean);
    if (!cred || cred[1] !== this.authToken || !users.includes(cred[0])) {
      const why = !cred
        ? 'no Basic credentials'
        : cred[1] !== this.authToken
          ? 'the password is not TWILIO_AUTH_TOKEN'
          : `the user ${cred[0]} is neither the call's AccountSid nor TWILIO_ACCOUNT_SID`;
      return this.#error(res, 401, 20003, `Authenticate (${why})`, path);
    }
    let call = this.calls.get(ids.callSid);
    if (!call && this.anyCall) {
      call = { accountSid: ids.accountSid, status: 'in-progress', started: Date.now() };
      this.calls.set(ids.callSid, call);
    }
    if (!call || call.accountSid !== ids.accountSid) {
      return this.#error(res, 404, 20404, `The requested resource ${path} was not found`, path);
    }
    const form = [...new URLSearchParams(body)];
    const value = (name) => form.find(([k]) => k === name)?.[1];
    const status = value('Status');
    const twiml = value('Twiml');
    if (twiml !== undefined && value('Url') !== undefined) {
      return this.#error(res, 400, 21205, 'Twiml and Url parameters are mutually exclusive', path);
    }
    if (status !== undefined && status !== 'completed' && status !== 'canceled') {
      return this.#error(res, 400, 21218, `Invalid Status: ${status}`, path);
    }
    if (call.status === 'completed' && (twiml !== undefined || value('Url') !== undefined)) {
      return this.#error(res, 400, 21220, 'Call is not in-progress. Cannot redirect.', path);
    }
    const ending = status === 'completed' && call.status !== 'completed';
    if (status === 'completed') call.status = 'completed';
    const now = rfc2822();
    const duration = String(Math.round((Date.now() - call.started) / 1000));
    const resource = {
      sid: ids.callSid,
      account_sid: ids.accountSid,
      api_version: '2010-04-01',
      status: call.status,
      direction: 'inbound',
      date_created: now,
      date_updated: now,
      start_time: now,
      end_time: call.status === 'completed' ? now : null,
      duration: call.status === 'completed' ? duration : null,
      price: null,
      parent_call_sid: null,
      uri: `/2010-04-01/Accounts/${ids.accountSid}/Calls/${ids.callSid}.json`,
      subresource_uris: {
        recordings: `/2010-04-01/Accounts/${ids.accountSid}/Calls/${ids.callSid}/Recordings.json`,
        streams: `/2010-04-01/Accounts/${ids.accountSid}/Calls/${ids.callSid}/Streams.json`,
      },
    };
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(resource));
    if (ending || twiml !== undefined || value('Url') !== undefined) {
      this.emit('update', { ...ids, form, status, twiml, url: value('Url') });
    }
  }
}
