/** Memory is not timing, so it is tested: each image's runtime, with the flags its image runs with, starts
 * cold (its executable a fresh copy out of the page cache, so the code it reads counts against the group, as
 * in a pod), gets ready, and streams 64 keep-alive connections of 1 MiB bodies for 10 s inside a cgroup with
 * the CPU and memory limits and the log level the ambassador is shipped with (k8s/order-service.yaml), and
 * must not be OOM-killed, nor stall (no byte to any client for as long as a client waits), and must serve a
 * body whole once the load is gone. How many bodies it gets through in those 10 s is the machine's speed as
 * much as the ambassador's, so it is printed, not held: `npm run bench:pod` measures it against a bare
 * runtime and nginx in the same run. Bun's stall at its limit with 64 bodies in flight, which PROCESS_MAX_IN_FLIGHT
 * prevents, shows under `npm run bench:pod`'s load (wrk and nginx, after a phase of small requests), not under
 * this client's; limits.test.ts holds the limit itself. Where no cgroup can be made (not root, no cgroup
 * hierarchy) it says so loudly and skips. */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http from 'node:http';
import { describe, expect, it } from 'vitest';
import { cannotMakeGroups, coldCopy, type Limits, makeGroup, podLimits, podLogLevel } from '../bench/cgroup.ts';
import { IMAGE_NODE_FLAGS, IMAGE_SEA_OPTIONS } from '../bench/common.ts';
import { BUN_BIN, deadPort, NODE, SEA, skippedBecause, startUpstream, stopAfterEach, waitFor } from './helpers.ts';

const SECONDS = 10;

const limits = podLimits();
const unavailable = await cannotMakeGroups(limits);

const images: Array<{ name: string; argv: string[]; env: Record<string, string>; limits: Limits }> = [
  {
    name: 'ambassador:bun (the Bun binary, the image k8s/ runs)',
    argv: [BUN_BIN],
    env: {},
    limits,
  },
  {
    name: "ambassador:node (the bundle with the image's V8 flags)",
    argv: [NODE, ...IMAGE_NODE_FLAGS, 'dist/ambassador.mjs'],
    env: {},
    limits,
  },
  {
    name: 'ambassador:sea (NODE_OPTIONS as the image sets it)',
    argv: [SEA],
    env: { NODE_OPTIONS: IMAGE_SEA_OPTIONS },
    limits,
  },
];

describe.skipIf(unavailable !== undefined)(
  skippedBecause(
    "memory inside the pod's limits",
    unavailable && `no cgroup with the pod's limits can be made here (${unavailable})`,
  ),
  () => {
    stopAfterEach();

    it.each(images)(
      '$name streams 64 connections of 1 MiB bodies for 10 s without an OOM kill or a stall',
      async ({ argv, env, limits: l }) => {
        const body = Buffer.alloc(1024 * 1024, 'a');
        const upstream = await startUpstream((_req, res) => res.end(body));
        const group = makeGroup(`ambassador-memory-test-${process.pid}-${Math.round(Math.random() * 1e6)}`, l);
        const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-memory-'));
        try {
          const executable = coldCopy(argv[0], tmp);
          const [port, admin] = [await deadPort(), await deadPort()]; // free now, and taken by the ambassador
          const join = group.procs.map((f) => `echo $$ > ${f}`).join('; ');
          const child = spawn('sh', ['-c', `${join}; exec "$@"`, 'sh', executable, ...argv.slice(1)], {
            cwd: new URL('..', import.meta.url).pathname,
            env: {
              PATH: process.env.PATH ?? '',
              ...env,
              UPSTREAM_URL: upstream.url,
              PORT: String(port),
              ADMIN_PORT: String(admin),
              ADMIN_HOST: '127.0.0.1',
              LOG_LEVEL: podLogLevel(), // as the pod runs it: an access line a request, read from a pipe
            },
            stdio: ['ignore', 'pipe', 'inherit'],
          });
          child.stdout!.resume();
          let exit: { code: number | null; signal: string | null } | undefined;
          child.once('exit', (code, signal) => (exit = { code, signal }));
          await waitFor(
            'the ambassador ready',
            async () => (await fetch(`http://127.0.0.1:${admin}/readyz`).catch(() => undefined))?.status === 200,
            30_000,
          );

          const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
          const start = performance.now();
          const until = start + SECONDS * 1000;
          // A stall is the ambassador moving no byte to any client: the longest such quiet, from the first
          // request to the last answer. Queueing is not a stall: inside 100m, with 32 places for 64
          // connections, a body can wait its turn longer than a client waits, and how many do depends on the
          // machine's speed as much as on the ambassador.
          let lastByte = start;
          let quietest = 0;
          const progress = () => {
            const now = performance.now();
            quietest = Math.max(quietest, now - lastByte);
            lastByte = now;
          };
          let done = 0;
          let short = 0; // ended as if whole, with fewer bytes: never allowed
          let late = 0; // no progress for 5 s under the CPU limit: the client gave up
          let broken = 0; // ended in an error, as a body the ambassador could not finish must
          // An answer of the ambassador's own, whole: a 504 once TRY_TIMEOUT_MS (5 s, as long as the client
          // waits) passes without the upstream's headers under the CPU limit, a 503 near the memory limit, or
          // a 503 while the breaker keeps the upstream out after five such timeouts in a row.
          const answered = new Map<number, number>(); // by status
          const one = () =>
            new Promise<void>((resolve) => {
              const req = http.get({ host: '127.0.0.1', port, path: '/big', agent, timeout: 5000 }, (res) => {
                let bytes = 0;
                res.on('data', (c: Buffer) => ((bytes += c.length), progress()));
                res.on('end', () => {
                  const status = res.statusCode!;
                  if (status !== 200) answered.set(status, (answered.get(status) ?? 0) + 1);
                  else if (bytes === body.length) done++;
                  else short++;
                  resolve();
                });
                res.on('error', () => (req.destroyed && timedOut ? late++ : broken++, resolve()));
              });
              let timedOut = false;
              req.on('timeout', () => ((timedOut = true), req.destroy()));
              req.on('error', () => (timedOut ? late++ : broken++, resolve()));
            });
          await Promise.all(Array.from({ length: 64 }, async () => {
            while (performance.now() < until && exit === undefined) await one();
          }));
          quietest = Math.max(quietest, performance.now() - lastByte);
          agent.destroy();
          // And once the load is gone, the places its abandoned requests held are free again: one more body
          // comes back whole. Where the load made five tries in a row time out, the breaker has ejected the
          // upstream, as BREAKER_FAILURES says it must, and the answer is a 503 that says when to come back:
          // the app waits as told (Retry-After), up to as long as the first two ejections last, and asks again.
          let after = '';
          let ejected = 0; // seconds waited on an open circuit
          for (let ask = 0; ask < 4; ask++) {
            const res = await fetch(`http://127.0.0.1:${port}/big`, { signal: AbortSignal.timeout(10_000) })
              .catch((err: Error) => err.name);
            if (typeof res === 'string') {
              after = res;
              break;
            }
            const bytes = new Uint8Array(await res.arrayBuffer());
            after = `${res.status} ${bytes.byteLength} bytes`;
            const wait = Number(res.headers.get('retry-after'));
            const open = res.status === 503 && new TextDecoder().decode(bytes).includes('circuit open');
            if (!open || !(wait > 0) || ejected + wait > 15) break;
            await new Promise((resolve) => setTimeout(resolve, wait * 1000));
            ejected += wait;
          }
          const oomKills = group.oomKills();
          const peakMiB = group.peakBytes() / 1024 ** 2;
          console.log(
            `memory: ${argv[argv.length - 1]}: ${done} bodies of 1 MiB in ${SECONDS} s (${late} later than 5 s, ${
              [...answered].map(([status, n]) => `${n} × ${status}`).join(', ') || 'none'
            } answered by the ambassador itself, ${broken} broken, ${short} short), peak ${peakMiB.toFixed(0)} of ${
              l.memoryBytes / 1024 ** 2
            } MiB, OOM kills ${oomKills}, no byte to any client for ${
              (quietest / 1000).toFixed(2)
            } s at most, then ${after}${ejected ? ` after ${ejected} s on an open circuit` : ''}`,
          );
          // Never OOM-killed, never a body that ends short as if whole, none broken; never 5 s without a byte
          // to any client, and whole again once the load is gone.
          expect({ oomKills, exit, short, broken }).toEqual({ oomKills: 0, exit: undefined, short: 0, broken: 0 });
          expect({ quiet: quietest < 5000, after }).toEqual({ quiet: true, after: `200 ${body.length} bytes` });
          child.kill('SIGKILL');
        } finally {
          await group.remove();
          rmSync(tmp, { recursive: true, force: true });
        }
      },
      90_000,
    );
  },
);
