/** The text log format, for people: values that could pass for more fields are quoted. */
import { describe, expect, it } from 'vitest';
import { batchedLines, createLogger, logEvents, type RequestRecord } from '../../ambassador.ts';
import { ACCESS_LINE_KEYS } from '../helpers.ts';

describe('text log lines', () => {
  it('quote any value that could pass for more fields, so a field can never be forged', () => {
    const lines: string[] = [];
    const log = createLogger('text', 'info', (l) => lines.push(l));
    log('info', 'request', {
      id: 'x route=admin method=DELETE status=200',
      path: '/a b"c',
      route: 'default',
      status: 200,
      ok: 'plain-value_1.2:/@+',
    });
    const line = lines[0];
    expect(line).toContain('id="x route=admin method=DELETE status=200"');
    expect(line).toContain('path="/a b\\"c"');
    expect(line).toContain('ok=plain-value_1.2:/@+');
    // Outside the quoted values, each field appears once.
    const bare = line.replace(/"(?:[^"\\]|\\.)*"/g, '""');
    expect(bare.match(/ route=/g)).toHaveLength(1);
    expect(bare.match(/ status=/g)).toHaveLength(1);
  });
});

describe('JSON log lines', () => {
  it('are what JSON.stringify makes of the time, the level, the message and the fields, in that order', () => {
    const lines: string[] = [];
    const log = createLogger('json', 'debug', (l) => lines.push(l));
    const fields = {
      id: 'a"b\\c',
      route: 'r',
      status: 200,
      bytes: null,
      gone: undefined,
      list: ['x', 1],
      nested: { ok: true },
    };
    log('info', 'request "quoted"\n', fields);
    log('notice', 'listening');
    const first = JSON.parse(lines[0]);
    expect(lines[0]).toBe(JSON.stringify({ time: first.time, level: 'info', msg: 'request "quoted"\n', ...fields }));
    expect(lines[1]).toBe(JSON.stringify({ time: JSON.parse(lines[1]).time, level: 'notice', msg: 'listening' }));
    expect(Date.parse(first.time)).toBeGreaterThan(Date.now() - 5000);
  });
});

describe('the access line of a request', () => {
  const record: RequestRecord = {
    id: 'r1',
    route: 'default',
    endpoint: '10.0.0.7:8080',
    method: 'GET',
    path: '/a',
    status: 200,
    attempts: 1,
    durationMs: 1.23456,
    upstreamMs: 0.5,
    bytesIn: 0,
    bytesOut: 29,
  };
  const line = (r: RequestRecord) => {
    const lines: string[] = [];
    logEvents(createLogger('json', 'info', (l) => lines.push(l)), 'info').requestDone(r);
    expect(lines).toHaveLength(1);
    return JSON.parse(lines[0]);
  };

  it('has its fields in one order, and the ones a request has only sometimes after the rest', () => {
    const always = ACCESS_LINE_KEYS;
    expect(Object.keys(line(record))).toEqual(always);
    const failed = line({ ...record, status: 503, rejected: 'concurrency', error: 'no place', closedBy: 'app' });
    expect(Object.keys(failed)).toEqual([...always, 'rejected', 'error', 'closed_by']);
    expect(failed).toMatchObject({ level: 'warn', rejected: 'concurrency', error: 'no place', closed_by: 'app' });
    expect(Object.keys(line({ ...record, error: 'client went away' }))).toEqual([...always, 'error']);
  });
});

describe('batched log lines', () => {
  it('marks warnings and errors urgent, routine lines not', () => {
    const urgent: boolean[] = [];
    const log = createLogger('json', 'debug', (_line, u) => urgent.push(u));
    log('debug', 'a');
    log('info', 'b');
    log('warn', 'c');
    log('error', 'd');
    log('notice', 'e');
    expect(urgent).toEqual([false, false, true, true, true]);
  });

  it('writes routine lines of one turn of the event loop together as it ends, a warning as its run of code ends; flush writes at once', async () => {
    const writes: string[] = [];
    const out = batchedLines((text, written) => (writes.push(text), written()));
    const turn = () => new Promise((r) => setImmediate(r));
    out.write('one');
    await Promise.resolve();
    out.write('two'); // a later microtask of the same turn: the same write
    expect(writes).toEqual([]);
    await turn();
    expect(writes).toEqual(['one\ntwo']);
    out.write('three');
    out.flush();
    expect(writes).toEqual(['one\ntwo', 'three']);
    out.flush();
    await turn();
    expect(writes).toHaveLength(2);
    // A warning, urgent, goes out as the run of code that wrote it ends, with the routine lines before it.
    out.write('routine');
    out.write('warning', true);
    out.write('after');
    expect(writes).toHaveLength(2);
    await Promise.resolve();
    expect(writes.slice(2)).toEqual(['routine\nwarning\nafter']);
    await turn();
    expect(writes).toHaveLength(3);
    for (let i = 0; i < 1000; i++) out.write(String(i));
    // The end of this turn (a timer of 0 ms could run first: the loop visits timers before immediates).
    await turn();
    expect(writes).toHaveLength(4);
    expect(writes[3].split('\n')).toEqual(Array.from({ length: 1000 }, (_, i) => String(i)));
  });
  it('has one write out at a time: the lines that come meanwhile go in the next, in order', async () => {
    const writes: string[] = [];
    const acks: Array<() => void> = [];
    const out = batchedLines((text, written) => (writes.push(text), acks.push(written)));
    const turn = () => new Promise((r) => setImmediate(r));
    out.write('a');
    await turn();
    out.write('b');
    out.write('c', true);
    await turn();
    expect(writes).toEqual(['a']); // stdout has not taken 'a' yet
    acks.shift()!();
    expect(writes).toEqual(['a', 'b\nc']);
    acks.shift()!();
    out.write('d');
    await turn();
    expect(writes).toEqual(['a', 'b\nc', 'd']);
  });

  it('holds the text waiting for stdout to 1 MiB: past it a line is dropped and counted, and told once stdout takes lines again', async () => {
    const writes: string[] = [];
    const acks: Array<() => void> = [];
    const told: number[] = [];
    const out = batchedLines((text, written) => (writes.push(text), acks.push(written)), (n) => told.push(n));
    const turn = () => new Promise((r) => setImmediate(r));
    const line = 'x'.repeat(1023); // a KiB with its line end
    for (let i = 0; i < 1500; i++) out.write(line);
    await turn();
    // Stdout takes nothing: the first write is out with 1,024 lines (1 MiB), the rest dropped.
    expect(writes).toHaveLength(1);
    expect(writes[0].split('\n')).toHaveLength(1024);
    expect(out.dropped).toBe(1500 - 1024);
    expect(told).toEqual([]);
    for (let i = 0; i < 10; i++) out.write(line);
    expect(out.dropped).toBe(1500 - 1024 + 10);
    // Stdout takes the write: the drops are told, once, and lines go out again.
    acks.shift()!();
    expect(told).toEqual([1500 - 1024 + 10]);
    out.write('after');
    await turn();
    expect(writes.slice(1)).toEqual(['after']);
    acks.shift()!();
    expect(out.dropped).toBe(486);
    expect(told).toHaveLength(1);
  });

  it('at exit, waits for the write out, then writes what waits through the exit writer', async () => {
    const writes: string[] = [];
    const acks: Array<() => void> = [];
    const atExit: string[] = [];
    const out = batchedLines(
      (text, written) => (writes.push(text), acks.push(written)),
      undefined,
      (text) => atExit.push(text),
    );
    const turn = () => new Promise((r) => setImmediate(r));
    out.write('one');
    await turn();
    out.write('two');
    out.write('three', true);
    let flushed = false;
    const flushing = out.flush().then(() => (flushed = true));
    await turn();
    // 'one' is still out (an exit now could drop it): nothing more is written, by either writer.
    expect({ writes, atExit, flushed }).toEqual({ writes: ['one'], atExit: [], flushed: false });
    acks.shift()!();
    await flushing;
    expect({ writes, atExit }).toEqual({ writes: ['one'], atExit: ['two\nthree'] });
  });

  it('at exit, waits for a write out no longer than half a second', async () => {
    const atExit: string[] = [];
    const out = batchedLines(() => {}, undefined, (text) => atExit.push(text)); // stdout never takes it
    out.write('one');
    await new Promise((r) => setImmediate(r));
    out.write('two');
    const t0 = performance.now();
    await out.flush();
    expect(performance.now() - t0).toBeGreaterThanOrEqual(450);
    expect(atExit).toEqual(['two']);
  });

  it('at exit, writes at once what waits when no write is out', async () => {
    const atExit: string[] = [];
    const out = batchedLines(() => {}, undefined, (text) => atExit.push(text));
    out.write('one');
    void out.flush();
    expect(atExit).toEqual(['one']);
  });
});
