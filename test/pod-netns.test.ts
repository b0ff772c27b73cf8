/** The walkthrough with a pod's topology: order-service and the ambassador share one network namespace
 * (one 127.0.0.1, as containers of a pod do); the inventory lives in another, reached over a veth pair.
 * "Scale to 0" both ways: stop the inventory, and cut the link. Needs root and iproute2; where network
 * namespaces cannot be made, the test says so and skips. */
import { execFileSync, spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AmbassadorProc,
  ARTIFACTS,
  ip,
  namespacesUnavailable,
  type ServiceProc,
  skippedBecause,
  startAmbassador,
  startService,
} from './helpers.ts';

// Addresses inside the two namespaces each run creates; nothing outside them is ever addressed.
const POD_IP = '10.231.0.1';
const INVENTORY_IP = '10.231.0.2';

const why = namespacesUnavailable(`amb${process.pid % 100000}`);

// Each artifact in a pair of namespaces of its own (names short enough for a veth: 15 characters).
describe.skipIf(why !== undefined).each(
  ARTIFACTS.map((runtime, i) => [runtime, `amb${process.pid % 100000}${i}`] as const),
)(
  skippedBecause(
    'the walkthrough in a pod topology, network namespaces (%s)',
    why && `cannot create network namespaces here (${why})`,
  ),
  (runtime, tag) => {
    const POD = `${tag}-pod`;
    const NODE = `${tag}-inv`;
    let inventory: ServiceProc | undefined;
    let amb: AmbassadorProc;
    let order: ServiceProc;
    const inPod = ['ip', 'netns', 'exec', POD];
    const inNode = ['ip', 'netns', 'exec', NODE];
    const curl = (url: string) =>
      execFileSync('ip', ['netns', 'exec', POD, 'curl', '-s', '-w', '\n%{http_code}', '--max-time', '10', url])
        .toString();

    beforeAll(async () => {
      ip('netns', 'add', POD);
      ip('netns', 'add', NODE);
      ip('link', 'add', `${tag}-a`, 'type', 'veth', 'peer', 'name', `${tag}-b`);
      ip('link', 'set', `${tag}-a`, 'netns', POD);
      ip('link', 'set', `${tag}-b`, 'netns', NODE);
      ip('-n', POD, 'addr', 'add', `${POD_IP}/30`, 'dev', `${tag}-a`);
      ip('-n', NODE, 'addr', 'add', `${INVENTORY_IP}/30`, 'dev', `${tag}-b`);
      for (const [ns, dev] of [[POD, `${tag}-a`], [NODE, `${tag}-b`]]) {
        ip('-n', ns, 'link', 'set', 'lo', 'up');
        ip('-n', ns, 'link', 'set', dev, 'up');
      }
      inventory = await startService('node', 'inventory-service', { PORT: '9000', HOST: INVENTORY_IP }, inNode);
      amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `http://${INVENTORY_IP}:9000`,
        PORT: '8080',
        ADMIN_HOST: '0.0.0.0',
        ADMIN_PORT: '9901',
        TRY_TIMEOUT_MS: '500',
        REQUEST_TIMEOUT_MS: '3000',
        RETRY_BACKOFF_MS: '50',
      }, inPod);
      order = await startService(
        'node',
        'order-service',
        { PORT: '3000', AMBASSADOR_URL: 'http://localhost:8080' },
        inPod,
      );
    });

    afterAll(async () => {
      await Promise.all([order?.stop(), amb?.stop(), inventory?.stop()]);
      for (const ns of [POD, NODE]) {
        try {
          ip('netns', 'del', ns);
        } catch {
          // already gone
        }
      }
    });

    it("the order service reaches the inventory through the ambassador on the pod's localhost", () => {
      expect(curl('http://127.0.0.1:3000/order')).toBe(
        'Order received. Inventory says: {"item":"widget","stock":42}\n200',
      );
    });

    it('the ambassador is not reachable from outside the pod (it listens on loopback)', () => {
      const out = spawnSync('ip', [
        'netns',
        'exec',
        NODE,
        'curl',
        '-s',
        '-o',
        '/dev/null',
        '-w',
        '%{http_code}',
        '--max-time',
        '3',
        `http://${POD_IP}:8080/inventory`,
      ]);
      expect(out.stdout.toString()).toBe('000');
      expect(out.status).toBe(7); // curl: could not connect
    });

    it('the admin port answers probes from outside the pod, but refuses /shutdown from there', () => {
      const fromOutside = (...args: string[]) =>
        spawnSync('ip', ['netns', 'exec', NODE, 'curl', '-s', '--max-time', '3', ...args]).stdout.toString();
      expect(fromOutside(`http://${POD_IP}:9901/readyz`)).toBe('ready\n');
      expect(fromOutside('-X', 'POST', '-w', '%{http_code}', '-o', '/dev/null', `http://${POD_IP}:9901/shutdown`)).toBe(
        '403',
      );
      expect(amb.child.exitCode).toBeNull();
    });

    it('inventory stopped: 502 promptly, one log line per attempt', async () => {
      inventory!.kill('SIGKILL');
      const before = amb.logs().length;
      const out = curl('http://127.0.0.1:3000/order');
      expect(out, out).toMatch(/upstream error: 502 .*\(3 attempts\)\n+502$/s);
      await amb.waitForLine((l) => l.includes('attempt 3 failed'));
      expect(amb.logs().slice(before).filter((l) => /^attempt \d failed/.test(String(l.msg)))).toHaveLength(3);
    });

    it('inventory back: the chain recovers', async () => {
      await inventory!.exited;
      inventory = await startService('node', 'inventory-service', { PORT: '9000', HOST: INVENTORY_IP }, inNode);
      expect(curl('http://127.0.0.1:3000/order')).toMatch(/Inventory says: .*\n200$/);
    });

    it('link cut: the app gets a 502/504 within the request timeout, and the chain recovers when the link returns', () => {
      ip('-n', POD, 'link', 'set', `${tag}-a`, 'down');
      const t0 = performance.now();
      const out = curl('http://127.0.0.1:3000/order');
      expect(performance.now() - t0).toBeLessThan(5000);
      expect(out).toMatch(/upstream error: 50[24] .*\n502$/s);
      ip('-n', POD, 'link', 'set', `${tag}-a`, 'up');
      ip('-n', NODE, 'link', 'set', `${tag}-b`, 'up');
      expect(curl('http://127.0.0.1:3000/order')).toMatch(/Inventory says: .*\n200$/);
    });
  },
);
