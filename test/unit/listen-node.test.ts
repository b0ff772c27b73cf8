/** Node's listener hands each request to the proxy app, which writes every answer itself. An answer it did not
 * write, or a failure nothing answered, should never come; if one does, the app still gets a 500 (or, once a head
 * is out, a cut connection) and the failure is said through the structured log (`Work.failed`), not lost on
 * stderr. Here the handler is one the test writes, on Node's own server, in-process. */
import { describe, expect, it } from 'vitest';
import { nodeRuntime } from '../../ambassador.ts';
import { onStop, rawRequest, stopAfterEach } from '../helpers.ts';

type Handler = Parameters<Awaited<ReturnType<typeof nodeRuntime>>['listen']>[0];

async function listening(handler: Handler) {
  const failures: string[] = [];
  const listener = await (await nodeRuntime()).listen(handler, '127.0.0.1', 0, {
    uploadsRead: () => Promise.resolve(),
    inFlight: () => 0,
    failed: (error) => failures.push(error),
    warn: (message) => failures.push(message),
  });
  onStop(async () => {
    listener.cutOff();
    await listener.close();
  });
  return { port: listener.port, failures };
}

describe("Node's listener, when an answer is not written", () => {
  stopAfterEach();

  it('answers 500 and closes, and says why in the log, for an answer the handler returned unwritten', async () => {
    const { port, failures } = await listening(() => new Response('never written', { status: 201 }));
    const raw = await rawRequest(port, 'GET /a HTTP/1.1\r\nHost: x\r\n\r\n', 3000);
    expect(raw).toMatch(/^HTTP\/1\.1 500 /);
    expect(raw.toLowerCase()).toContain('\r\nconnection: close\r\n');
    expect(raw).toContain('ambassador: internal error');
    expect(failures).toEqual([expect.stringContaining('an answer not written (201)')]);
  });

  it('answers 500 for a failure the handler threw or rejected with, and says it in the log', async () => {
    const thrown = await listening(() => {
      throw new Error('thrown at once');
    });
    expect(await rawRequest(thrown.port, 'GET / HTTP/1.1\r\nHost: x\r\n\r\n', 3000)).toMatch(/^HTTP\/1\.1 500 /);
    expect(thrown.failures).toEqual([expect.stringContaining('thrown at once')]);
    const rejected = await listening(() => Promise.reject(new Error('rejected later')));
    expect(await rawRequest(rejected.port, 'GET / HTTP/1.1\r\nHost: x\r\n\r\n', 3000)).toMatch(/^HTTP\/1\.1 500 /);
    expect(rejected.failures).toEqual([expect.stringContaining('rejected later')]);
  });
});
