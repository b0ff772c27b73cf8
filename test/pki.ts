/** Certificates for the TLS tests, made with the `openssl` command in a temporary folder: two CAs (one the
 * upstream's, one that signed nothing the upstream presents), a server certificate, and client
 * certificates from a client CA. Small EC keys, so the whole set takes a fraction of a second. */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface Pki {
  dir: string;
  file(name: string): string;
  read(name: string): string;
  /** a certificate (and key) signed by `ca`: `${name}.pem` and `${name}.key` */
  issue(name: string, ca: string, subject: string, altNames?: string): void;
  remove(): void;
}

export function makePki(): Pki {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-pki-'));
  const file = (name: string) => path.join(dir, name);
  const openssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const ca = (name: string) => openssl('req', '-x509', ...key, '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '2', '-subj', `/CN=${name}`);
  const issue = (name: string, signer: string, subject: string, altNames?: string) => {
    openssl('req', ...key, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${subject}`);
    writeFileSync(file(`${name}.ext`), altNames ? `subjectAltName=${altNames}\n` : 'extendedKeyUsage=clientAuth\n');
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${signer}.pem`, '-CAkey', `${signer}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', `${name}.ext`);
  };
  for (const name of ['upstream-ca', 'other-ca', 'client-ca']) ca(name);
  issue('server', 'upstream-ca', 'localhost', 'DNS:localhost,DNS:inventory.internal,IP:127.0.0.1');
  issue('only-internal', 'upstream-ca', 'inventory.internal', 'DNS:inventory.internal');
  issue('client-one', 'client-ca', 'client-one');
  issue('client-two', 'client-ca', 'client-two');
  return { dir, file, read: (name) => readFileSync(file(name), 'utf8'), issue, remove: () => rmSync(dir, { recursive: true, force: true }) };
}
