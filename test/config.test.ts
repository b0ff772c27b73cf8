/** Configuration: bad values stop the process before it listens, with exit
 * code 2 and one message naming every bad variable, its value and what was expected (the parsing itself: test/unit/config.test.ts). */
import net from 'node:net';
import { describe, expect, it } from 'vitest';

import { has } from '../bench/common.ts';
import {
  ARTIFACTS,
  command,
  type Proc,
  runtimeOf,
  skippedBecause,
  startAmbassador,
  startProcess,
  startUpstream,
  stopAfterEach,
  threadPolicies,
} from './helpers.ts';

/** Why a refused SCHED_BATCH cannot be staged here: it takes root (to drop CAP_SYS_NICE) and util-linux's tools. */
const missingTool = ['prlimit', 'setpriv', 'chrt'].find((tool) => !has(tool));
const refusalUntestable = process.getuid?.() !== 0
  ? 'not root: dropping CAP_SYS_NICE from the bounding set needs it'
  : missingTool && `${missingTool} (util-linux) is not installed`;

/** The exit code of a process that should stop at start; one that takes the setting and starts listening instead
 * is ended after 20 s, and its code is null. */
async function exitCode(p: Proc): Promise<number | null> {
  const { code } = await Promise.race([
    p.exited,
    new Promise<{ code: number | null }>((r) => setTimeout(() => r({ code: null }), 20_000)),
  ]);
  p.kill('SIGKILL');
  return code;
}

describe.each(ARTIFACTS)('bad configuration stops the process (%s)', (runtime) => {
  stopAfterEach();

  it('exits 2 naming HOST and PORT when it cannot listen there (an address not of this machine, a port taken)', async () => {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const taken = (blocker.address() as net.AddressInfo).port;
    try {
      for (const env of [{ HOST: '10.255.255.254', PORT: '0' }, { HOST: '127.0.0.1', PORT: String(taken) }]) {
        const p = startProcess(command(runtime), { UPSTREAM_URL: 'http://127.0.0.1:9', ADMIN_PORT: '0', ...env });
        const { code } = await p.exited;
        expect(code, JSON.stringify(env)).toBe(2);
        const err = p.stderr.join('\n');
        expect(err).toContain(
          `HOST=${JSON.stringify(env.HOST)}, PORT=${
            JSON.stringify(env.PORT)
          }: expected an address of this machine and a port free on it`,
        );
      }
    } finally {
      blocker.close();
    }
  });

  it('exits 2 naming a time setting past what a timer can wait (2^31 - 1 ms), rather than fire it at once', async () => {
    for (const name of ['DRAIN_TIMEOUT_MS', 'QUEUE_TIMEOUT_MS']) {
      const p = startProcess(command(runtime), {
        UPSTREAM_URL: 'http://127.0.0.1:9',
        PORT: '0',
        ADMIN_PORT: '0',
        [name]: '2147483648',
      });
      const code = await exitCode(p);
      expect(code, name).toBe(2);
      expect(p.stderr.join('\n')).toContain(`${name}="2147483648": expected a whole number from 0 to 2147483647`);
    }
  });

  it('exits 2 before listening, naming every bad variable on stderr', async () => {
    const p = startProcess(command(runtime), {
      UPSTREAM_URL: 'not a url',
      RETRY_ATTEMPTS: '0',
      LOG_FORMAT: 'yaml',
      PORT: '0',
      ADMIN_PORT: '0',
    });
    const { code } = await p.exited;
    expect(code).toBe(2);
    const err = p.stderr.join('\n');
    expect(err).toContain('UPSTREAM_URL="not a url"');
    expect(err).toContain('RETRY_ATTEMPTS="0"');
    expect(err).toContain('LOG_FORMAT="yaml"');
    expect(p.lines.join('\n')).not.toContain('listening');
  });

  it(
    runtimeOf(runtime) === 'bun'
      ? 'SCHED_POLICY=batch runs every thread under SCHED_BATCH, the HTTP client thread that fetch starts later included'
      : 'exits 2 naming SCHED_POLICY=batch, which this runtime cannot set',
    async () => {
      if (runtimeOf(runtime) !== 'bun') {
        const p = startProcess(command(runtime), {
          UPSTREAM_URL: 'http://127.0.0.1:9',
          PORT: '0',
          ADMIN_PORT: '0',
          SCHED_POLICY: 'batch',
        });
        const code = await exitCode(p);
        expect(code).toBe(2);
        expect(p.stderr.join('\n')).toContain(
          `SCHED_POLICY="batch": expected normal on ${
            runtimeOf(runtime)
          }, which has no way to set a thread's scheduling policy`,
        );
        return;
      }
      const upstream = await startUpstream();
      for (const [policy, expected] of [[undefined, 0], ['batch', 3]] as const) {
        const amb = await startAmbassador(runtime, {
          UPSTREAM_URL: upstream.url,
          ...(policy && { SCHED_POLICY: policy }),
        });
        const res = await fetch(`${amb.url}/x`);
        expect(await res.text()).toBe('ok');
        const threads = threadPolicies(amb.pid);
        expect(threads.map(([name]) => name), 'the thread Bun fetches on').toContain('HTTP Client');
        expect(threads.filter(([, p]) => p !== expected), `SCHED_POLICY=${policy}`).toEqual([]);
        await amb.stop();
      }
    },
  );

  if (runtimeOf(runtime) === 'bun') {
    it.skipIf(refusalUntestable)(
      skippedBecause('exits 2 naming SCHED_POLICY=batch when the system refuses it, and why', refusalUntestable),
      async () => {
        // Started under SCHED_IDLE without CAP_SYS_NICE and with RLIMIT_NICE 0, a process may not leave SCHED_IDLE.
        const p = startProcess(
          [
            ...['prlimit', '--nice=0', 'setpriv', '--bounding-set', '-sys_nice', '--inh-caps', '-sys_nice'],
            ...['chrt', '--idle', '0', ...command(runtime)],
          ],
          { UPSTREAM_URL: 'http://127.0.0.1:9', PORT: '0', ADMIN_PORT: '0', SCHED_POLICY: 'batch' },
        );
        const code = await exitCode(p);
        expect(code).toBe(2);
        expect(p.stderr.join('\n')).toContain(
          `SCHED_POLICY="batch": expected normal, since this system would not run the process's threads under ` +
            'SCHED_BATCH (sched_setscheduler refused the main thread)',
        );
        expect(p.lines.join('\n')).not.toContain('listening');
      },
    );
  }
});
