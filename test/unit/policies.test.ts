/** The pure policies, with an injected clock and random source: nothing here sleeps or opens a socket. */
import { describe, expect, it } from 'vitest';
import {
  backoffDelay,
  classifyFailure,
  decideRetry,
  forwardHeaders,
  type HeaderList,
  headerValue,
  isRetryableOutcome,
  parseRetryAfter,
  responseHeaders,
  RetryBudget,
  type RetryInput,
  stripHopByHop,
  upstreamUrl,
} from '../../ambassador.ts';

describe('backoffDelay', () => {
  it('grows exponentially from the base and is capped', () => {
    expect(backoffDelay(1, 100, 2000, 0.999)).toBe(99);
    expect(backoffDelay(2, 100, 2000, 0.999)).toBe(199);
    expect(backoffDelay(3, 100, 2000, 0.999)).toBe(399);
    expect(backoffDelay(10, 100, 2000, 0.999)).toBe(1998);
  });
  it('is fully jittered: random 0 gives 0, random 0.5 gives half the ceiling', () => {
    expect(backoffDelay(3, 100, 2000, 0)).toBe(0);
    expect(backoffDelay(3, 100, 2000, 0.5)).toBe(200);
  });
});

describe('parseRetryAfter', () => {
  const now = Date.parse('2026-01-01T00:00:00Z');
  it('reads delta-seconds', () => expect(parseRetryAfter('3', now)).toBe(3000));
  it('reads an HTTP-date relative to now', () =>
    expect(parseRetryAfter('Thu, 01 Jan 2026 00:00:02 GMT', now)).toBe(2000));
  it('treats a date in the past as no wait', () =>
    expect(parseRetryAfter('Wed, 31 Dec 2025 23:00:00 GMT', now)).toBe(0));
  it('ignores absent or unreadable values', () => {
    expect(parseRetryAfter(null, now)).toBeUndefined();
    expect(parseRetryAfter('soon', now)).toBeUndefined();
    expect(parseRetryAfter('-1', now)).toBeUndefined();
  });
});

describe('isRetryableOutcome', () => {
  it('retries idempotent methods on 502, 503, 504 but not on 500 or 429', () => {
    for (const status of [502, 503, 504]) expect(isRetryableOutcome({ status }, 'GET', false)).toBe(true);
    expect(isRetryableOutcome({ status: 500 }, 'GET', false)).toBe(false);
    expect(isRetryableOutcome({ status: 429 }, 'GET', false)).toBe(false);
  });
  it('never repeats a POST or PATCH the upstream may have received', () => {
    for (const method of ['POST', 'PATCH']) {
      expect(isRetryableOutcome({ status: 503 }, method, false)).toBe(false);
      expect(isRetryableOutcome({ failure: 'timeout' }, method, false)).toBe(false);
      expect(isRetryableOutcome({ failure: 'reset' }, method, false)).toBe(false);
    }
  });
  it('repeats a POST the upstream cannot have received (refused, DNS)', () => {
    expect(isRetryableOutcome({ failure: 'refused' }, 'POST', false)).toBe(true);
    expect(isRetryableOutcome({ failure: 'dns' }, 'PATCH', false)).toBe(true);
  });
  it('treats an Idempotency-Key as permission to repeat any method', () => {
    expect(isRetryableOutcome({ status: 503 }, 'POST', true)).toBe(true);
    expect(isRetryableOutcome({ failure: 'timeout' }, 'POST', true)).toBe(true);
  });
  it('does not retry TLS failures, which a second try will not fix', () => {
    expect(isRetryableOutcome({ failure: 'tls' }, 'GET', false)).toBe(false);
  });
});

describe('decideRetry', () => {
  const base: RetryInput = {
    outcome: { status: 503 },
    method: 'GET',
    idempotencyKey: false,
    attempt: 1,
    maxAttempts: 3,
    bodyReplayable: true,
    budgetAvailable: true,
    endpointAvailable: true,
    retryAfterMs: undefined,
    backoffMs: 40,
    remainingMs: Infinity,
  };
  it('retries after the backoff delay', () => expect(decideRetry(base)).toEqual({ retry: true, delayMs: 40 }));
  it('uses Retry-After instead of the backoff when it fits the deadline', () => {
    expect(decideRetry({ ...base, retryAfterMs: 1000, remainingMs: 5000 })).toEqual({ retry: true, delayMs: 1000 });
  });
  it('gives up when Retry-After does not fit the deadline', () => {
    expect(decideRetry({ ...base, retryAfterMs: 10_000, remainingMs: 5000 })).toEqual({
      retry: false,
      reason: 'deadline',
    });
  });
  it('stops after the last attempt', () =>
    expect(decideRetry({ ...base, attempt: 3 })).toEqual({ retry: false, reason: 'attempts' }));
  it('says a POST was not retried because of its method', () => {
    expect(decideRetry({ ...base, method: 'POST' })).toEqual({ retry: false, reason: 'method' });
  });
  it('says a body too large to replay stopped the retry', () => {
    expect(decideRetry({ ...base, bodyReplayable: false })).toEqual({ retry: false, reason: 'body' });
  });
  it('says the budget stopped the retry', () => {
    expect(decideRetry({ ...base, budgetAvailable: false })).toEqual({ retry: false, reason: 'budget' });
  });
  it('calls a plain 404 or 500 final, not skipped', () => {
    expect(decideRetry({ ...base, outcome: { status: 404 } })).toEqual({ retry: false, reason: 'final' });
    expect(decideRetry({ ...base, outcome: { failure: 'tls' } })).toEqual({ retry: false, reason: 'final' });
  });
});

describe('RetryBudget', () => {
  it('allows the per-second floor when there is little traffic', () => {
    const b = new RetryBudget(20, 1); // floor: 1/s over a 10 s window = 10 retries
    let t = 1_000_000;
    b.recordRequest(t);
    let allowed = 0;
    while (b.canRetry(t) && allowed < 100) {
      b.recordRetry(t);
      allowed++;
    }
    expect(allowed).toBe(10);
  });
  it('allows a percentage of requests on top of the floor', () => {
    const b = new RetryBudget(20, 0);
    const t = 5_000_000;
    for (let i = 0; i < 100; i++) b.recordRequest(t);
    let allowed = 0;
    while (b.canRetry(t) && allowed < 100) {
      b.recordRetry(t);
      allowed++;
    }
    expect(allowed).toBe(20);
  });
  it('forgets retries older than the ten-second window', () => {
    const b = new RetryBudget(0, 1);
    const t = 9_000_000;
    for (let i = 0; i < 10; i++) b.recordRetry(t);
    expect(b.canRetry(t)).toBe(false);
    expect(b.canRetry(t + 5_000)).toBe(false);
    expect(b.canRetry(t + 10_000)).toBe(true);
  });
});

describe('classifyFailure', () => {
  const nodeError = (code: string, message: string) =>
    Object.assign(new TypeError('fetch failed'), { cause: Object.assign(new Error(message), { code }) });
  it('reads Node fetch errors from their cause', () => {
    expect(classifyFailure(nodeError('ECONNREFUSED', 'connect ECONNREFUSED 127.0.0.1:1'))).toBe('refused');
    expect(classifyFailure(nodeError('ENOTFOUND', 'getaddrinfo ENOTFOUND x.invalid'))).toBe('dns');
    expect(classifyFailure(nodeError('ECONNRESET', 'read ECONNRESET'))).toBe('reset');
    expect(classifyFailure(nodeError('UND_ERR_SOCKET', 'other side closed'))).toBe('reset');
    expect(classifyFailure(nodeError('DEPTH_ZERO_SELF_SIGNED_CERT', 'self-signed certificate'))).toBe('tls');
  });
  it('reads Deno fetch errors from their message', () => {
    expect(
      classifyFailure(
        new TypeError(
          'error sending request for url (http://127.0.0.1:9/): client error (Connect): tcp connect error: Connection refused (os error 111)',
        ),
      ),
    ).toBe('refused');
    expect(
      classifyFailure(
        new TypeError(
          'client error (Connect): dns error: failed to lookup address information: Name or service not known',
        ),
      ),
    ).toBe('dns');
    expect(classifyFailure(new TypeError('client error (SendRequest): connection closed before message completed')))
      .toBe('reset');
  });
  it('recognises the per-try timer', () => {
    expect(classifyFailure(Object.assign(new Error('no response headers within 100 ms'), { name: 'TimeoutError' })))
      .toBe('timeout');
  });
});

describe('headers', () => {
  const get = (list: HeaderList, name: string) => headerValue(list, name);
  it('strips hop-by-hop headers and every header named in Connection', () => {
    const list: HeaderList = [
      ['connection', 'close, X-Secret-Hop'],
      ['x-secret-hop', '1'],
      ['keep-alive', 'timeout=5'],
      ['te', 'trailers'],
      ['transfer-encoding', 'chunked'],
      ['upgrade', 'websocket'],
      ['proxy-authorization', 'Basic x'],
      ['x-kept', 'yes'],
    ];
    expect(stripHopByHop(list)).toEqual([['x-kept', 'yes']]);
  });
  it('honours every Connection header, not only the first', () => {
    expect(stripHopByHop([['connection', 'x-a'], ['x-a', '1'], ['connection', 'X-B'], ['x-b', '2'], ['x-c', '3']]))
      .toEqual([['x-c', '3']]);
  });
  it('adds X-Forwarded-*, Via and a request id, and keeps traceparent', () => {
    const h = forwardHeaders(
      [
        ['host', 'localhost:8080'],
        ['traceparent', '00-abc-def-01'],
        ['x-forwarded-for', '10.0.0.1'],
        ['expect', '100-continue'],
        ['accept-encoding', 'gzip'],
        ['x-request-id', 'old'],
      ],
      'rid',
      '127.0.0.1',
    );
    expect(get(h, 'host')).toBeNull();
    expect(get(h, 'expect')).toBeNull();
    expect(get(h, 'accept-encoding')).toBe('identity');
    expect(get(h, 'x-forwarded-for')).toBe('10.0.0.1, 127.0.0.1');
    expect(get(h, 'x-forwarded-host')).toBe('localhost:8080');
    expect(get(h, 'x-forwarded-proto')).toBe('http');
    expect(get(h, 'via')).toBe('1.1 ambassador');
    expect(get(h, 'x-request-id')).toBe('rid');
    expect(get(h, 'traceparent')).toBe('00-abc-def-01');
    expect(h.filter(([n]) => n === 'x-request-id' || n === 'x-forwarded-for')).toHaveLength(2);
  });
  it("keeps the app's own X-Forwarded-Proto and -Host, and appends to Via", () => {
    const h = forwardHeaders(
      [['host', 'a'], ['x-forwarded-proto', 'https'], ['x-forwarded-host', 'shop.example'], ['via', '1.1 edge']],
      'rid',
      undefined,
    );
    expect(get(h, 'x-forwarded-proto')).toBe('https');
    expect(get(h, 'x-forwarded-host')).toBe('shop.example');
    expect(get(h, 'via')).toBe('1.1 edge, 1.1 ambassador');
  });
  it('passes content-encoding and content-length through untouched: bodies are never decoded', () => {
    const h = responseHeaders([['content-encoding', 'gzip'], ['content-length', '30'], ['connection', 'close'], [
      'set-cookie',
      'a=1',
    ], ['set-cookie', 'b=2']], 'rid');
    expect(get(h, 'content-encoding')).toBe('gzip');
    expect(get(h, 'content-length')).toBe('30');
    expect(get(h, 'connection')).toBeNull();
    expect(get(h, 'x-request-id')).toBe('rid');
    expect(h.filter(([n]) => n === 'set-cookie').map(([, v]) => v)).toEqual(['a=1', 'b=2']);
  });
  it('appends the request path and query to the upstream base path exactly as sent', () => {
    expect(upstreamUrl(new URL('http://inv:9000'), '/a%2Fb?x=%20y')).toBe('http://inv:9000/a%2Fb?x=%20y');
    expect(upstreamUrl(new URL('http://inv:9000/api/'), '/items')).toBe('http://inv:9000/api/items');
  });
});
