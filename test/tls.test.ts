/** TLS to the upstream, against a real Node https server with certificates made for the test: the
 * certificate is verified by default and against UPSTREAM_CA_FILE, a client certificate is presented for
 * mTLS, a rotated client certificate is taken up without a restart, and every failure is a 502 with a
 * clear log line — never a silent downgrade. */
import { spawnSync } from 'node:child_process';
import { renameSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type net from 'node:net';
import type tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ARTIFACTS,
  command,
  runtimeOf,
  skippedBecause,
  sleep,
  startAmbassador,
  startProcess,
  stopAfterEach,
} from './helpers.ts';
import { makePki, type Pki } from './pki.ts';

const hasOpenssl = spawnSync('sh', ['-c', 'command -v openssl']).status === 0;

let pki: Pki;
beforeAll(() => {
  if (hasOpenssl) pki = makePki();
});
afterAll(() => pki?.remove());

interface TlsUpstream {
  port: number;
  /** the client certificate's subject CN for each request that got through ('' when none was shown) */
  seen: string[];
  close(): Promise<void>;
}

async function tlsUpstream(
  options: { cert?: string; clientCa?: boolean; maxVersion?: tls.SecureVersion } = {},
): Promise<TlsUpstream> {
  const seen: string[] = [];
  const name = options.cert ?? 'server';
  const server = https.createServer({
    key: pki.read(`${name}.key`),
    cert: pki.read(`${name}.pem`),
    maxVersion: options.maxVersion,
    ...(options.clientCa ? { ca: pki.read('client-ca.pem'), requestCert: true, rejectUnauthorized: true } : {}),
  }, (req, res) => {
    const peer = (req.socket as tls.TLSSocket).getPeerCertificate();
    seen.push(String(peer?.subject?.CN ?? ''));
    res.end(`hello over ${(req.socket as tls.TLSSocket).getProtocol()}`);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    seen,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

describe.skipIf(!hasOpenssl).each(ARTIFACTS)(
  skippedBecause('TLS to the upstream (%s)', hasOpenssl ? undefined : 'openssl not installed (Debian package openssl)'),
  (runtime) => {
    stopAfterEach();
    const upstreams: TlsUpstream[] = [];
    const upstream = async (options?: Parameters<typeof tlsUpstream>[0]) => {
      const u = await tlsUpstream(options);
      upstreams.push(u);
      return u;
    };
    afterAll(async () => {
      for (const u of upstreams) await u.close();
    });

    it("verifies the upstream's certificate against UPSTREAM_CA_FILE", async () => {
      const up = await upstream();
      const amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `https://localhost:${up.port}`,
        UPSTREAM_CA_FILE: pki.file('upstream-ca.pem'),
      });
      const res = await fetch(`${amb.url}/x`);
      expect(res.status).toBe(200);
      expect(await res.text()).toMatch(/^hello over TLSv1\.[23]$/);
      expect(up.seen).toHaveLength(1);
    });

    it('refuses a certificate that another CA signed: 502 with the reason, a tls line in the log, no retry', async () => {
      const up = await upstream();
      const amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `https://localhost:${up.port}`,
        UPSTREAM_CA_FILE: pki.file('other-ca.pem'),
      });
      const res = await fetch(`${amb.url}/x`);
      expect(res.status).toBe(502);
      expect(await res.text()).toMatch(/certificate|issuer|UnknownIssuer/i);
      expect(up.seen).toHaveLength(0);
      await amb.settled();
      const attempt = amb.logs().find((l) => l.kind === 'tls');
      expect(attempt).toMatchObject({ level: 'warn', attempt: 1, skip: 'final' });
    });

    it('refuses a certificate that names its host in the Common Name only, without a subjectAltName (RFC 6125)', async () => {
      const up = await upstream({ cert: 'cn-only' });
      const amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `https://localhost:${up.port}`,
        UPSTREAM_CA_FILE: pki.file('upstream-ca.pem'),
        RETRY_ATTEMPTS: '1',
      });
      const res = await fetch(`${amb.url}/x`);
      expect(res.status).toBe(502);
      expect(up.seen).toEqual([]);
      const line = JSON.parse(await amb.waitForLine((l) => l.includes('"msg":"request"'))) as { error: string };
      expect(line.error).toMatch(runtimeOf(runtime) === 'deno' ? /certificate|name/i : /has no subjectAltName/);
    });

    it('verifies by default: without a CA file, a certificate from a private CA is refused', async () => {
      const up = await upstream();
      const amb = await startAmbassador(runtime, { UPSTREAM_URL: `https://localhost:${up.port}` });
      expect((await fetch(`${amb.url}/x`)).status).toBe(502);
      expect(up.seen).toHaveLength(0);
    });

    it('presents the client certificate for mTLS, and the upstream refuses the ambassador without one', async () => {
      const up = await upstream({ clientCa: true });
      const env = { UPSTREAM_URL: `https://localhost:${up.port}`, UPSTREAM_CA_FILE: pki.file('upstream-ca.pem') };
      const withCert = await startAmbassador(runtime, {
        ...env,
        UPSTREAM_CERT_FILE: pki.file('client-one.pem'),
        UPSTREAM_KEY_FILE: pki.file('client-one.key'),
      });
      expect((await fetch(`${withCert.url}/x`)).status).toBe(200);
      expect(up.seen).toEqual(['client-one']);
      const without = await startAmbassador(runtime, { ...env, RETRY_ATTEMPTS: '1' });
      const res = await fetch(`${without.url}/x`);
      expect(res.status).toBe(502);
      expect(up.seen).toEqual(['client-one']);
    });

    it('takes up a rotated client certificate without a restart, as a Kubernetes Secret update swaps the files', async () => {
      const up = await upstream({ clientCa: true });
      const dir = pki.file('rotating');
      const cert = `${dir}.pem`;
      const key = `${dir}.key`;
      // Written to the side and renamed into place, so the ambassador never reads half a file.
      const install = (name: string) => {
        writeFileSync(`${cert}.new`, pki.read(`${name}.pem`));
        writeFileSync(`${key}.new`, pki.read(`${name}.key`));
        renameSync(`${key}.new`, key);
        renameSync(`${cert}.new`, cert);
      };
      install('client-one');
      const amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `https://localhost:${up.port}`,
        UPSTREAM_CA_FILE: pki.file('upstream-ca.pem'),
        UPSTREAM_CERT_FILE: cert,
        UPSTREAM_KEY_FILE: key,
      });
      expect((await fetch(`${amb.url}/x`)).status).toBe(200);
      install('client-two');
      await sleep(1200);
      await (await fetch(`${amb.url}/x`)).text(); // the look at the files happens with a request
      expect((await fetch(`${amb.url}/x`)).status).toBe(200);
      expect(up.seen[0]).toBe('client-one');
      expect(up.seen.at(-1)).toBe('client-two');
      await amb.settled();
      expect(amb.logs().some((l) => l.msg === 'TLS files changed: new connections use them' && l.route === 'default'))
        .toBe(true);
    });

    it("keeps the certificate in use when a rotation brings a key that is not the new certificate's, and says so", async () => {
      const up = await upstream({ clientCa: true });
      const cert = pki.file('mismatch.pem');
      const key = pki.file('mismatch.key');
      const install = (certOf: string, keyOf: string) => {
        writeFileSync(`${cert}.new`, pki.read(`${certOf}.pem`));
        writeFileSync(`${key}.new`, pki.read(`${keyOf}.key`));
        renameSync(`${key}.new`, key);
        renameSync(`${cert}.new`, cert);
      };
      install('client-one', 'client-one');
      const amb = await startAmbassador(runtime, {
        UPSTREAM_URL: `https://localhost:${up.port}`,
        UPSTREAM_CA_FILE: pki.file('upstream-ca.pem'),
        UPSTREAM_CERT_FILE: cert,
        UPSTREAM_KEY_FILE: key,
      });
      expect((await fetch(`${amb.url}/x`)).status).toBe(200);
      install('client-two', 'client-one'); // the certificate renewed, its key not yet
      await sleep(1200);
      for (let i = 0; i < 3; i++) expect((await fetch(`${amb.url}/x`)).status).toBe(200);
      expect(up.seen.every((cn) => cn === 'client-one')).toBe(true);
      await amb.settled();
      const warning = amb.logs().find((l) => String(l.msg).startsWith('TLS files not taken up'));
      expect(warning).toMatchObject({ level: 'warn', route: 'default' });
      install('client-two', 'client-two'); // and now the key
      await sleep(1200);
      await (await fetch(`${amb.url}/x`)).text();
      expect((await fetch(`${amb.url}/x`)).status).toBe(200);
      expect(up.seen.at(-1)).toBe('client-two');
    });

    it("stops at start when the key is not the certificate's, naming both files", async () => {
      const p = startProcess(command(runtime), {
        UPSTREAM_URL: 'https://localhost:1',
        UPSTREAM_CERT_FILE: pki.file('client-one.pem'),
        UPSTREAM_KEY_FILE: pki.file('client-two.key'),
        PORT: '0',
        ADMIN_PORT: '0',
      });
      expect((await p.exited).code).toBe(2);
      const err = p.stderr.join('\n');
      expect(err).toContain(
        `UPSTREAM_CERT_FILE=${JSON.stringify(pki.file('client-one.pem'))}, UPSTREAM_KEY_FILE=${
          JSON.stringify(pki.file('client-two.key'))
        }: expected TLS files that can be used together`,
      );
      expect(err).toMatch(/mismatch/i);
    });

    it("stops at start when the CA file's certificate cannot be parsed, naming the file", async () => {
      const broken = pki.file('broken-ca.pem');
      writeFileSync(broken, '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n');
      const p = startProcess(command(runtime), {
        UPSTREAM_URL: 'https://localhost:1',
        UPSTREAM_CA_FILE: broken,
        PORT: '0',
        ADMIN_PORT: '0',
      });
      expect((await p.exited).code).toBe(2);
      expect(p.stderr.join('\n')).toContain(
        `UPSTREAM_CA_FILE=${JSON.stringify(broken)}: expected TLS files that can be used together`,
      );
    });

    it('stops at start when a TLS file cannot be read or holds no PEM, naming the variable', async () => {
      const p = startProcess(command(runtime), {
        UPSTREAM_URL: 'https://localhost:1',
        UPSTREAM_CA_FILE: '/nonexistent/ca.pem',
        UPSTREAM_CERT_FILE: pki.file('client-one.pem'),
        PORT: '0',
        ADMIN_PORT: '0',
      });
      expect((await p.exited).code).toBe(2);
      const err = p.stderr.join('\n');
      expect(err).toContain('UPSTREAM_CA_FILE="/nonexistent/ca.pem": expected a readable file holding CA certificates');
      expect(err).toContain(
        'UPSTREAM_KEY_FILE="": expected a file as well: a client certificate needs both UPSTREAM_CERT_FILE and UPSTREAM_KEY_FILE',
      );
    });

    if (runtime === 'deno') {
      it("refuses at start what Deno's client cannot do (a server name override, TLS 1.3 only), rather than ignore it", async () => {
        const p = startProcess(command(runtime), {
          UPSTREAM_URL: 'https://127.0.0.1:1',
          UPSTREAM_SERVER_NAME: 'inventory.internal',
          UPSTREAM_TLS_MIN_VERSION: 'TLSv1.3',
          PORT: '0',
          ADMIN_PORT: '0',
        });
        expect((await p.exited).code).toBe(2);
        const err = p.stderr.join('\n');
        expect(err).toContain('UPSTREAM_SERVER_NAME="inventory.internal": expected nothing on Deno');
        expect(err).toContain('UPSTREAM_TLS_MIN_VERSION="TLSv1.3": expected TLSv1.2 on Deno');
      });
    } else {
      it('verifies the name UPSTREAM_SERVER_NAME gives (and sends it as SNI) when the upstream is reached by address', async () => {
        const up = await upstream({ cert: 'only-internal' });
        const env = { UPSTREAM_URL: `https://127.0.0.1:${up.port}`, UPSTREAM_CA_FILE: pki.file('upstream-ca.pem') };
        const named = await startAmbassador(runtime, { ...env, UPSTREAM_SERVER_NAME: 'inventory.internal' });
        expect((await fetch(`${named.url}/x`)).status).toBe(200);
        const unnamed = await startAmbassador(runtime, env);
        const res = await fetch(`${unnamed.url}/x`);
        expect(res.status).toBe(502);
        expect(await res.text()).toMatch(
          /IP: 127\.0\.0\.1 is not in the cert's list|altnames|ERR_TLS_CERT_ALTNAME_INVALID/i,
        );
      });
    }

    if (runtimeOf(runtime) === 'bun') {
      it("refuses at start what Bun's fetch cannot do (TLS 1.3 only), rather than ignore it", async () => {
        const p = startProcess(command(runtime), {
          UPSTREAM_URL: 'https://127.0.0.1:1',
          UPSTREAM_TLS_MIN_VERSION: 'TLSv1.3',
          PORT: '0',
          ADMIN_PORT: '0',
        });
        expect((await p.exited).code).toBe(2);
        expect(p.stderr.join('\n')).toContain('UPSTREAM_TLS_MIN_VERSION="TLSv1.3": expected TLSv1.2 on Bun');
      });
    } else if (runtime !== 'deno') {
      it('holds to UPSTREAM_TLS_MIN_VERSION: an upstream that offers only TLS 1.2 is refused under TLSv1.3', async () => {
        const up = await upstream({ maxVersion: 'TLSv1.2' });
        const env = { UPSTREAM_URL: `https://localhost:${up.port}`, UPSTREAM_CA_FILE: pki.file('upstream-ca.pem') };
        const strict = await startAmbassador(runtime, { ...env, UPSTREAM_TLS_MIN_VERSION: 'TLSv1.3' });
        expect((await fetch(`${strict.url}/x`)).status).toBe(502);
        const lenient = await startAmbassador(runtime, env);
        const res = await fetch(`${lenient.url}/x`);
        expect(res.status).toBe(200);
        expect(await res.text()).toBe('hello over TLSv1.2');
      });
    }
  },
);
