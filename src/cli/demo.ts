/**
 * `npm start`: the quickstart. Generates demo certificates on first run (a CA, two server
 * certificates and a client certificate, all from src/pki/mint.ts), starts the built-in echo
 * upstream, runs the gateway on examples/quickstart/, and prints what to try.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createCa, issueCert } from '../pki/mint.js';
import { startGateway } from './run.js';
import { startEchoUpstream } from './echo-upstream.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

async function ensureCerts(dir: string): Promise<void> {
  if (existsSync(path.join(dir, 'client.key'))) return;
  mkdirSync(dir, { recursive: true });
  const ca = await createCa({ commonName: 'tlsgate demo CA', organization: 'tlsgate demo', keyType: 'EC' });
  writeFileSync(path.join(dir, 'ca.crt'), ca.certPem);
  for (const host of ['app.example.local', 'mtls.example.local']) {
    const c = await issueCert(ca, { commonName: host, dnsNames: [host], server: true, keyType: 'EC' });
    writeFileSync(path.join(dir, `${host}.crt`), c.chainPem ?? c.certPem);
    writeFileSync(path.join(dir, `${host}.key`), c.keyPem, { mode: 0o600 });
  }
  const client = await issueCert(ca, { commonName: 'client.example.local', organization: 'demo client', uris: ['spiffe://demo.local/ns/default/sa/curl'], client: true, keyType: 'EC' });
  writeFileSync(path.join(dir, 'client.crt'), client.certPem);
  writeFileSync(path.join(dir, 'client.key'), client.keyPem, { mode: 0o600 });
}

export async function demoCommand(opts: { adminPort: number }): Promise<number> {
  const dir = path.join(ROOT, 'examples', 'quickstart');
  const certs = path.join(dir, 'certs');
  await ensureCerts(certs);
  const echo = await startEchoUpstream(18080);
  const gw = await startGateway({
    config: [dir], adminPort: opts.adminPort, adminAddress: '127.0.0.1', bindAddress: '127.0.0.1',
    namespace: 'istio-system', accessLog: 'stdout', logLevel: 'info', drainGraceMs: 0, drainTimeoutMs: 2000,
    clientHelloTimeoutMs: 15000, watch: true,
  });
  if (!gw) { echo.close(); return 1; }
  const rel = path.relative(process.cwd(), certs) || '.';
  process.stderr.write(`
tlsgate quickstart is running (config: ${path.relative(process.cwd(), dir) || '.'}). Try:

  # plaintext HTTP to the echo upstream (it shows the x-forwarded-* headers the gateway added)
  curl -s http://127.0.0.1:8080/hello

  # a VirtualService redirect
  curl -si http://127.0.0.1:8080/old/page | head -3

  # TLS terminated by SNI (SIMPLE): the gateway presents app.example.local's certificate
  curl -s --cacert ${rel}/ca.crt --resolve app.example.local:8443:127.0.0.1 https://app.example.local:8443/

  # mutual TLS (MUTUAL): without a client certificate the handshake is refused ...
  curl -s --cacert ${rel}/ca.crt --resolve mtls.example.local:8443:127.0.0.1 https://mtls.example.local:8443/
  # ... with one, the upstream sees x-forwarded-client-cert
  curl -s --cacert ${rel}/ca.crt --cert ${rel}/client.crt --key ${rel}/client.key --resolve mtls.example.local:8443:127.0.0.1 https://mtls.example.local:8443/

  # an unknown SNI gets a TLS unrecognized_name alert
  openssl s_client -connect 127.0.0.1:8443 -servername nope.example.local </dev/null

  # the admin server
  curl -s http://127.0.0.1:${opts.adminPort}/config_dump | head -40
  curl -s http://127.0.0.1:${opts.adminPort}/stats/prometheus | grep tlsgate_

Access-log lines follow below. Ctrl-C stops everything.

`);
  return new Promise((resolve) => {
    const stop = () => {
      void gw.stop().then(() => { echo.close(); resolve(0); });
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
