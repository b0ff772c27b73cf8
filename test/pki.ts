/** Certificates for the TLS tests, in a temporary folder: two CAs (the upstream's, and one that signed
 * nothing the upstream presents), server certificates, and client certificates from a client CA. */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { issue, makeCa } from '../scripts/certificates.ts';

export interface Pki {
  dir: string;
  file(name: string): string;
  read(name: string): string;
  remove(): void;
}

export function makePki(): Pki {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-pki-'));
  for (const name of ['upstream-ca', 'other-ca', 'client-ca']) makeCa(dir, name, 2);
  issue(dir, 'server', 'upstream-ca', 'localhost', 'DNS:localhost,DNS:inventory.internal,IP:127.0.0.1', 2);
  issue(dir, 'only-internal', 'upstream-ca', 'inventory.internal', 'DNS:inventory.internal', 2);
  issue(dir, 'cn-only', 'upstream-ca', 'localhost', '', 2);
  issue(dir, 'client-one', 'client-ca', 'client-one', undefined, 2);
  issue(dir, 'client-two', 'client-ca', 'client-two', undefined, 2);
  const file = (name: string) => path.join(dir, name);
  return {
    dir,
    file,
    read: (name) => readFileSync(file(name), 'utf8'),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
