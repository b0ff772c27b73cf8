/** Certificates made with the `openssl` command, in a folder of the caller's: a CA, and certificates it
 * signs. Small EC keys (P-256), so a whole set takes a fraction of a second. For the demo's mTLS leg and
 * the TLS tests; nothing here is meant for production keys. */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';

const KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

function openssl(dir: string, ...args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A self-signed CA: `${name}.pem` and `${name}.key` in `dir`. */
export function makeCa(dir: string, name: string, days = 7): void {
  openssl(
    dir,
    'req',
    '-x509',
    ...KEY,
    '-keyout',
    `${name}.key`,
    '-out',
    `${name}.pem`,
    '-days',
    String(days),
    '-subj',
    `/CN=${name}`,
  );
}

/** A certificate `${name}.pem` (and `${name}.key`) for `subject`, signed by the CA `ca`: a server
 * certificate for `altNames` (e.g. `DNS:localhost,IP:127.0.0.1`), or without them a client certificate;
 * `''` makes a server certificate that names its host in the Common Name only (no subjectAltName). */
export function issue(dir: string, name: string, ca: string, subject: string, altNames?: string, days = 7): void {
  openssl(dir, 'req', ...KEY, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${subject}`);
  const ext = altNames
    ? `subjectAltName=${altNames}\n`
    : altNames === ''
    ? 'extendedKeyUsage=serverAuth\n'
    : 'extendedKeyUsage=clientAuth\n';
  writeFileSync(path.join(dir, `${name}.ext`), ext);
  openssl(
    dir,
    'x509',
    '-req',
    '-in',
    `${name}.csr`,
    '-CA',
    `${ca}.pem`,
    '-CAkey',
    `${ca}.key`,
    '-CAcreateserial',
    '-out',
    `${name}.pem`,
    '-days',
    String(days),
    '-extfile',
    `${name}.ext`,
  );
}
