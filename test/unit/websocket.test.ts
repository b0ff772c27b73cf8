/** The WebSocket pieces read in-process: which requests are WebSocket handshakes, the accept key, the frames
 * the ambassador writes, the reader of an upstream's frames (Deno, Bun), and the frame boundaries the drain
 * puts its close frame between (Node) — over arbitrary splits of the byte stream. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { acceptFor, encodeFrame, FrameBoundaries, FrameReader, isWebSocketUpgrade } from '../../ambassador.ts';

/** A server's frame (unmasked), with FIN and the opcode as given (a fragment: fin false, or opcode 0). */
function frame(opcode: number, payload: Uint8Array, fin = true): Uint8Array {
  const out = encodeFrame(opcode, payload, false);
  out[0] = (fin ? 0x80 : 0) | opcode;
  return out;
}

/** `bytes` cut at `cuts` (offsets), as a connection might deliver them. */
function split(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const at = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const parts: Uint8Array[] = [];
  let from = 0;
  for (const c of at) (parts.push(bytes.subarray(from, c)), (from = c));
  parts.push(bytes.subarray(from));
  return parts;
}

function concatAll(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) (out.set(p, at), (at += p.length));
  return out;
}

function reader(maxBytes = 1 << 20) {
  const seen: string[] = [];
  const r = new FrameReader(maxBytes, {
    message: (text, data) => seen.push(`${text ? 'text' : 'binary'}:${new TextDecoder().decode(data)}`),
    ping: (p) => seen.push(`ping:${new TextDecoder().decode(p)}`),
    close: (code, reason) => seen.push(`close:${code}:${reason}`),
    fail: (code, why) => seen.push(`fail:${code}:${why}`),
  });
  return { r, seen };
}

const text = (s: string) => new TextEncoder().encode(s);

describe('isWebSocketUpgrade', () => {
  it('takes a GET whose Upgrade names websocket and whose Connection names upgrade, in any case or list', () => {
    expect(isWebSocketUpgrade('GET', [['connection', 'Upgrade'], ['upgrade', 'websocket']])).toBe(true);
    expect(isWebSocketUpgrade('GET', [['connection', 'keep-alive, Upgrade'], ['upgrade', 'WebSocket']])).toBe(true);
    expect(isWebSocketUpgrade('GET', [['connection', 'upgrade'], ['upgrade', 'h2c, websocket']])).toBe(true);
  });
  it('takes nothing else: h2c, a POST, or no Connection: upgrade', () => {
    expect(isWebSocketUpgrade('GET', [['connection', 'Upgrade, HTTP2-Settings'], ['upgrade', 'h2c']])).toBe(false);
    expect(isWebSocketUpgrade('POST', [['connection', 'upgrade'], ['upgrade', 'websocket']])).toBe(false);
    expect(isWebSocketUpgrade('GET', [['upgrade', 'websocket']])).toBe(false);
    expect(isWebSocketUpgrade('GET', [['connection', 'upgrade'], ['upgrade', 'websocketx']])).toBe(false);
  });
});

describe('acceptFor', () => {
  it("gives RFC 6455's own example", async () => {
    expect(await acceptFor('dGhlIHNhbXBsZSBub25jZQ==')).toBe('s3pPLMBiTxaQ9kYGzzhZRbK+xOo=');
  });
});

describe('encodeFrame', () => {
  it('writes each length form, and a client frame masked so that unmasking gives the payload', () => {
    for (const n of [0, 125, 126, 65535, 65536]) {
      const payload = new Uint8Array(n).map((_, i) => i & 255);
      const plain = encodeFrame(2, payload, false);
      expect(plain.length).toBe(n + (n < 126 ? 2 : n < 65536 ? 4 : 10));
      const masked = encodeFrame(2, payload, true);
      const head = masked.length - n;
      expect(masked[1] & 0x80).toBe(0x80);
      const key = masked.subarray(head - 4, head);
      expect(masked.subarray(head).map((b, i) => b ^ key[i & 3])).toEqual(payload);
      const { r, seen } = reader();
      r.push(plain);
      expect(seen).toHaveLength(1);
      expect(seen[0].length).toBe('binary:'.length + new TextDecoder().decode(payload).length);
    }
  });
});

describe('FrameReader', () => {
  it('reads fragmented messages with control frames between, however the bytes are split', () => {
    const stream = concatAll([
      frame(1, text('hel'), false),
      frame(9, text('are you there')),
      frame(0, text('lo'), false),
      frame(0, text(' world')),
      frame(2, text('bin')),
      frame(8, new Uint8Array([0x03, 0xe9, ...text('bye')])),
    ]);
    fc.assert(fc.property(fc.array(fc.nat(), { maxLength: 12 }), (cuts) => {
      const { r, seen } = reader();
      for (const part of split(stream, cuts)) r.push(part);
      expect(seen).toEqual(['ping:are you there', 'text:hello world', 'binary:bin', 'close:1001:bye']);
    }));
  });

  it('fails a masked server frame, reserved bits, a bad control frame and a fragment out of order with 1002', () => {
    const cases: Uint8Array[] = [
      encodeFrame(1, text('x'), true),
      (() => {
        const f = frame(1, text('x'));
        f[0] |= 0x40; // RSV1: compression nobody agreed to
        return f;
      })(),
      frame(9, new Uint8Array(126)),
      frame(8, text(''), false),
      frame(0, text('x')),
      concatAll([frame(1, text('a'), false), frame(1, text('b'))]),
      frame(3, text('x')),
    ];
    for (const bytes of cases) {
      const { r, seen } = reader();
      r.push(bytes);
      r.push(frame(1, text('after')));
      expect(seen).toHaveLength(1);
      expect(seen[0]).toMatch(/^fail:1002:/);
    }
  });

  it('fails a message past its limit with 1009, its fragments counted together', () => {
    const second = reader(10);
    second.r.push(concatAll([frame(1, text('123456'), false), frame(0, text('123456'))]));
    expect(second.seen).toEqual(['fail:1009:a message larger than 10 bytes']);
  });

  it('reads a close frame with no code as null', () => {
    const { r, seen } = reader();
    r.push(frame(8, new Uint8Array(0)));
    expect(seen).toEqual(['close:null:']);
  });
});

describe('FrameBoundaries', () => {
  it('stops exactly between frames, and sees a close frame pass, however the bytes are split', () => {
    const frames = [frame(1, text('one')), frame(2, new Uint8Array(300)), frame(8, new Uint8Array([3, 233]))];
    const stream = concatAll(frames);
    const ends = frames.map((_, i) => frames.slice(0, i + 1).reduce((n, f) => n + f.length, 0));
    fc.assert(fc.property(fc.array(fc.nat(), { maxLength: 10 }), (cuts) => {
      let closes = 0;
      const b = new FrameBoundaries(() => closes++);
      const stops: number[] = [];
      let offset = 0;
      for (const part of split(stream, cuts)) {
        let rest = part;
        while (rest.length > 0) {
          if (b.atBoundary) {
            b.advance(rest.subarray(0, 1), false); // into the next frame's head
            rest = rest.subarray(1);
            offset += 1;
            continue;
          }
          const n = b.advance(rest, true);
          rest = rest.subarray(n);
          offset += n;
          if (b.atBoundary) stops.push(offset);
        }
      }
      expect(stops).toEqual(ends);
      expect(closes).toBe(1);
    }));
  });
});
