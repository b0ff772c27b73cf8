/**
 * The payments service of the demo: a dependency reached only over mutual TLS. `POST /payments` answers
 * {"payment":"accepted","client":"<CN of the client certificate>"}; a client without a certificate from
 * CLIENT_CA_FILE does not get past the handshake. The app never sees any of it: its ambassador holds the
 * client certificate and speaks TLS on its behalf.
 *
 * | variable       | default        | meaning                                                  |
 * |----------------|----------------|----------------------------------------------------------|
 * | PORT / HOST    | 9443 / 0.0.0.0 | where it listens (HTTPS only)                            |
 * | TLS_CERT_FILE  | (required)     | its certificate chain, PEM                               |
 * | TLS_KEY_FILE   | (required)     | its private key, PEM                                     |
 * | CLIENT_CA_FILE | (required)     | the CA whose client certificates it accepts, PEM         |
 *
 * Run: node dist/services/payments-service.mjs, or deno run --allow-net --allow-env --allow-read services/payments-service.ts
 */
import { Hono } from 'hono';
import { environment, fail, intVar, serve } from './serve.ts';

const env = environment();
const files = { cert: 'TLS_CERT_FILE', key: 'TLS_KEY_FILE', ca: 'CLIENT_CA_FILE' } as const;
const tls = {} as Record<keyof typeof files, string>;
const { readFileSync } = await import('node:fs');
for (const [key, name] of Object.entries(files) as Array<[keyof typeof files, string]>) {
  const file = env[name]?.trim();
  if (!file) fail(`${name} is not set: expected a PEM file`);
  try {
    tls[key] = readFileSync(file, 'utf8');
  } catch (err) {
    fail(`${name}=${JSON.stringify(file)}: expected a readable PEM file (${(err as Error).message})`);
  }
}

interface PeerSocket {
  getPeerCertificate?(): { subject?: { CN?: string } } | undefined;
}
const app = new Hono<{ Bindings: { incoming?: { socket?: PeerSocket } } }>();

app.get('/healthz', (c) => c.text('ok\n'));

app.post('/payments', (c) => {
  const client = c.env?.incoming?.socket?.getPeerCertificate?.()?.subject?.CN ?? 'unknown';
  return c.json({ payment: 'accepted', client });
});

void serve('payments', app, env.HOST?.trim() || '0.0.0.0', intVar(env, 'PORT', 9443, 0, 65535), {
  ...tls,
  requestCert: true,
  rejectUnauthorized: true,
});
