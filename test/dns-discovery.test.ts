/** Discovery as each runtime artifact does it in its own process: a name the runtime's own resolver looks
 * up in DNS, answered by a DNS server the test runs. All of it lives in a network namespace the test
 * creates (`ip netns exec` gives it its own /etc/resolv.conf, naming that server), with upstreams on
 * 127.0.0.2–4 sharing one port, like the pods behind a headless Service. Needs root and iproute2; where
 * network namespaces cannot be made, the test says so and skips. */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ARTIFACTS,
  ip,
  namespacesUnavailable,
  skippedBecause,
  startAmbassador,
  stopAfterEach,
  waitFor,
} from './helpers.ts';

const NS = `ambdns${process.pid % 100000}`;
const NAME = 'inventory.test';
const PORT = 18080;

/** A DNS server over node:dgram, in a few dozen lines: A records for NAME from the JSON file ANSWERS
 * (read at each query), no AAAA records, NXDOMAIN for any other name; a line per query. The records say they
 * hold for a day, as podman's DNS says of a container's: a resolver that keeps an answer for its TTL (Bun's
 * did) never sees a pod replaced, and the ambassador must look again every DNS_REFRESH_MS all the same. */
const DNS_SERVER = `
const dgram = require('node:dgram'); const fs = require('node:fs');
const s = dgram.createSocket('udp4');
s.on('message', (q, from) => {
  let at = 12; const labels = [];
  while (q[at] !== 0) { labels.push(q.subarray(at + 1, at + 1 + q[at]).toString()); at += q[at] + 1; }
  const name = labels.join('.').toLowerCase(); const type = q.readUInt16BE(at + 1); const question = q.subarray(12, at + 5);
  const known = name === process.env.NAME;
  const addresses = known && type === 1 ? JSON.parse(fs.readFileSync(process.env.ANSWERS, 'utf8') || '[]') : [];
  console.log(JSON.stringify({ name, type, answered: addresses }));
  const head = Buffer.alloc(12); q.copy(head, 0, 0, 2);
  head.writeUInt16BE(0x8580 | (known ? 0 : 3), 2); head.writeUInt16BE(1, 4); head.writeUInt16BE(addresses.length, 6);
  const answers = addresses.map((a) => { const r = Buffer.alloc(16); r.writeUInt16BE(0xc00c, 0); r.writeUInt16BE(1, 2); r.writeUInt16BE(1, 4);
    r.writeUInt32BE(86400, 6); r.writeUInt16BE(4, 10); a.split('.').forEach((o, i) => (r[12 + i] = Number(o))); return r; });
  s.send(Buffer.concat([head, question, ...answers]), from.port, from.address);
});
s.bind(53, '127.0.0.1', () => console.log('ready'));
`;

/** Three upstreams on one port, each answering with its own address. */
const PODS = `
const http = require('node:http');
let up = 0;
for (const host of ['127.0.0.2', '127.0.0.3', '127.0.0.4']) http.createServer((q, r) => r.end(q.socket.localAddress)).listen(${PORT}, host, () => ++up === 3 && console.log('ready'));
`;

function inNamespace(
  code: string,
  env: Record<string, string> = {},
): { child: ChildProcess; lines: string[]; ready: Promise<void> } {
  const child = spawn('ip', ['netns', 'exec', NS, process.execPath, '-e', code], {
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines: string[] = [];
  let buf = '';
  const ready = new Promise<void>((resolve) =>
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) {
        const line = buf.slice(0, i);
        lines.push(line);
        if (line === 'ready') resolve();
      }
    })
  );
  return { child, lines, ready };
}

/** A GET from inside the namespace (the only place the ambassador can be reached): the body, or the error. */
function get(url: string): string {
  try {
    return execFileSync('ip', ['netns', 'exec', NS, 'curl', '-s', '--max-time', '5', url]).toString();
  } catch (err) {
    return `curl failed: ${(err as Error).message}`;
  }
}

const why = namespacesUnavailable(NS);

describe.skipIf(why !== undefined)(
  skippedBecause(
    "discovery through DNS, in each runtime's own process",
    why && `cannot create network namespaces here (${why})`,
  ),
  () => {
    const tmp = path.join(os.tmpdir(), `${NS}-answers`);
    const answers = path.join(tmp, 'answers.json');
    // Written whole, then renamed into place: a query never reads a half-written file (it once read an empty
    // one, between the truncation and the write, and the server died on it).
    const answer = (addresses: string[]) => {
      writeFileSync(`${answers}.new`, JSON.stringify(addresses));
      renameSync(`${answers}.new`, answers);
    };
    let dns: ReturnType<typeof inNamespace>;
    let pods: ReturnType<typeof inNamespace>;
    beforeAll(async () => {
      ip('netns', 'add', NS);
      ip('-n', NS, 'link', 'set', 'lo', 'up');
      // `ip netns exec` mounts this over /etc/resolv.conf for what runs in the namespace.
      mkdirSync(`/etc/netns/${NS}`, { recursive: true });
      writeFileSync(`/etc/netns/${NS}/resolv.conf`, 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n');
      mkdirSync(tmp, { recursive: true });
      answer(['127.0.0.2']);
      dns = inNamespace(DNS_SERVER, { NAME, ANSWERS: answers });
      pods = inNamespace(PODS);
      await Promise.all([dns.ready, pods.ready]);
    });
    afterAll(() => {
      dns?.child.kill('SIGKILL');
      pods?.child.kill('SIGKILL');
      try {
        ip('netns', 'del', NS);
      } catch { /* already gone */ }
      rmSync(`/etc/netns/${NS}`, { recursive: true, force: true });
      rmSync(tmp, { recursive: true, force: true });
    });
    stopAfterEach();

    it.each(ARTIFACTS)(
      '%s: spreads over the addresses DNS gives, takes up new and gone ones, and keeps them when DNS fails',
      async (runtime) => {
        answer(['127.0.0.2']);
        const queriesBefore = dns.lines.length;
        const amb = await startAmbassador(runtime, {
          UPSTREAM_URL: `http://${NAME}:${PORT}`,
          DNS_REFRESH_MS: '1000',
          RETRY_BACKOFF_MS: '0',
        }, ['ip', 'netns', 'exec', NS]);
        const seen = (n: number) => new Set(Array.from({ length: n }, () => get(`${amb.url}/x`)));
        // What the ambassador knows is read from its log (each change lists the endpoints); what it does with
        // it, at the upstreams. (Least-loaded balancing sends sequential requests to the best of each pair it
        // draws, so "all three answered" is asked of 30 requests, not of a handful.)
        const known = (endpoints: string[]) =>
          amb.logs().some((l) =>
            l.msg === 'endpoints changed' &&
            JSON.stringify([...(l.endpoints as string[])].sort()) ===
              JSON.stringify(endpoints.map((e) => `${e}:${PORT}`).sort())
          );
        const logged = (what: string, check: () => boolean) =>
          waitFor(what, check, 10_000)
            .catch((err) => {
              throw new Error(`${err.message}\n${amb.lines.join('\n')}`);
            });

        // The first lookup (a request waits up to 2 s for it; on a loaded machine the test's DNS server may be
        // slower than that), then every request goes to the address it gave.
        await logged('127.0.0.2 known', () => {
          get(`${amb.url}/x`); // lookups happen when requests need them
          return known(['127.0.0.2']);
        });
        expect([...seen(8)], amb.lines.join('\n')).toEqual(['127.0.0.2']);
        // The runtime's own resolver asked the test's DNS server (asserted here, outside the resolver).
        await waitFor(
          'the DNS server to log the query',
          () => dns.lines.slice(queriesBefore).some((l) => l.includes(`"name":"${NAME}"`) && l.includes('"type":1')),
          3000,
        );

        answer(['127.0.0.2', '127.0.0.3', '127.0.0.4']);
        await logged('three endpoints known', () => {
          get(`${amb.url}/x`); // lookups happen when requests need them
          return known(['127.0.0.2', '127.0.0.3', '127.0.0.4']);
        });
        expect(seen(30).size).toBeGreaterThanOrEqual(2);

        answer(['127.0.0.3']);
        await logged('only 127.0.0.3 known', () => {
          get(`${amb.url}/x`); // lookups happen when requests need them
          return known(['127.0.0.3']);
        });
        expect([...seen(10)]).toEqual(['127.0.0.3']);

        // DNS goes silent: the endpoint it last gave stays in use, and the log says the lookup failed.
        dns.child.kill('SIGSTOP');
        try {
          await logged('a failed lookup in the log', () => {
            get(`${amb.url}/x`);
            return amb.logs().some((l) => String(l.msg).startsWith('discovery failed'));
          });
          const failed = amb.logs().find((l) => String(l.msg).startsWith('discovery failed'))!;
          expect(failed.endpoints).toEqual([`127.0.0.3:${PORT}`]);
          expect([...seen(4)]).toEqual(['127.0.0.3']);
        } finally {
          dns.child.kill('SIGCONT');
        }
      },
      60_000,
    );
  },
);
