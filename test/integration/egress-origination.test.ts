/**
 * Istio's "Egress Gateways with TLS Origination" task, SIMPLE and mutual, with the task's own
 * YAML: an app sends plain HTTP through its sidecar, the sidecar sends it over Istio mTLS
 * (ISTIO_MUTUAL, SNI = the external host) to the egress gateway, which terminates the mTLS,
 * routes by Host and originates TLS (SIMPLE, then MUTUAL with a client certificate) to the
 * external server, here a local nginx reached through ServiceEntry endpoints.
 * Ports the task writes as 80/443 on the egress gateway are free ports picked at run time.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePorts } from '../helpers/ports.js';
import { startTlsgate, runCli, type Gateway } from '../helpers/tlsgate.js';
import { makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl } from '../helpers/exec.js';
import { startNginx, nginxTlsServer, type Nginx } from '../helpers/nginx.js';

let dir: string;
let ca: Ca;
let nginxCert: KeyPair;
let client: KeyPair;
/** Every nginx started, stopped in after(): a test that fails midway must not leave one running (its handle would keep this file's process alive). */
const nginxes: Nginx[] = [];
const procs: Gateway[] = [];

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-egress-orig-'));
  ca = await makeCa(dir, 'example.com', '/O=example Inc./CN=example.com');
  nginxCert = await makeLeaf(dir, ca, 'nginx', { cn: 'my-nginx.mesh-external.svc.cluster.local', o: 'some organization', serial: 0, sans: ['DNS:my-nginx.mesh-external.svc.cluster.local', 'DNS:edition.cnn.com'] });
  client = await makeLeaf(dir, ca, 'client.example.com', { cn: 'client.example.com', o: 'client organization', serial: 1 });
  const r = await runCli(['ca', 'init', '--dir', path.join(dir, 'meshca')]);
  assert.equal(r.code, 0, r.stderr);
});

after(async () => {
  for (const p of procs) await p.stop();
  for (const n of nginxes) await n.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function mesh(cfg: string, gatewayArgs: string[]): Promise<{ outbound: number; egress: Gateway }> {
  const [outbound] = await freePorts(1) as [number];
  const meshca = path.join(dir, 'meshca');
  const egress = await startTlsgate({
    configPaths: [cfg],
    args: ['--labels', 'istio=egressgateway', '--namespace', 'istio-system', '--service-account', 'istio-egressgateway-service-account', '--ca-dir', meshca, ...gatewayArgs],
    env: { NODE_EXTRA_CA_CERTS: ca.cert },
  });
  procs.push(egress);
  const sidecar = await startTlsgate({
    configPaths: [cfg],
    args: ['--sidecar', '--namespace', 'default', '--service-account', 'sleep', '--labels', 'app=sleep', '--ca-dir', meshca, '--outbound-port', String(outbound)],
  });
  procs.push(sidecar);
  return { outbound, egress };
}

test('SIMPLE origination at the egress gateway: HTTP in, Istio mTLS to the gateway, TLS to the external host', async () => {
  const [pNginx, pGw] = await freePorts(2) as [number, number];
  const nginx = await startNginx({ http: nginxTlsServer({ port: pNginx, cert: nginxCert.cert, key: nginxCert.key, serverName: '_' }) });
  nginxes.push(nginx);
  const cfg = path.join(dir, 'simple');
  await import('node:fs/promises').then((f) => f.mkdir(cfg));
  await writeFile(path.join(cfg, 'task.yaml'), `apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: cnn
spec:
  hosts:
  - edition.cnn.com
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 443
    name: https
    protocol: HTTPS
    targetPort: ${pNginx}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: istio-egressgateway
  namespace: istio-system
spec:
  selector:
    istio: egressgateway
  servers:
  - port:
      number: ${pGw}
      name: https-port-for-tls-origination
      protocol: HTTPS
    hosts:
    - edition.cnn.com
    tls:
      mode: ISTIO_MUTUAL
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: egressgateway-for-cnn
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: cnn
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
      portLevelSettings:
      - port:
          number: ${pGw}
        tls:
          mode: ISTIO_MUTUAL
          sni: edition.cnn.com
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: direct-cnn-through-egress-gateway
spec:
  hosts:
  - edition.cnn.com
  gateways:
  - istio-system/istio-egressgateway
  - mesh
  http:
  - match:
    - gateways:
      - mesh
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port:
          number: ${pGw}
      weight: 100
  - match:
    - gateways:
      - istio-system/istio-egressgateway
      port: ${pGw}
    route:
    - destination:
        host: edition.cnn.com
        port:
          number: 443
      weight: 100
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: originate-tls-for-edition-cnn-com
spec:
  host: edition.cnn.com
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    portLevelSettings:
    - port:
        number: 443
      tls:
        mode: SIMPLE # initiates HTTPS for connections to edition.cnn.com
---
# Where the egress gateway runs (a Kubernetes Service in the task).
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: istio-egressgateway
  namespace: istio-system
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: ${pGw}, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {istio: egressgateway}}]
`);
  const { outbound, egress } = await mesh(cfg, []);
  const r = await curl(['-x', `http://127.0.0.1:${outbound}`, 'http://edition.cnn.com/politics']);
  assert.equal(r.status, 200, r.body);
  assert.equal(r.httpVersion, '1.1');
  const j = JSON.parse(r.body);
  assert.equal(j.ssl_server_name, 'edition.cnn.com');
  assert.equal(j.request_uri, '/politics');
  // The gateway's access log: the request arrived over mTLS from the sidecar's identity and
  // went to the external host's port 443 cluster.
  const entry = await egress.waitForAccessLog((e) => e.path === '/politics');
  assert.equal(entry.status, 200);
  assert.equal(entry.upstreamCluster, 'outbound|443||edition.cnn.com');
  assert.equal(entry.peerUriSan, 'spiffe://cluster.local/ns/default/sa/sleep');
  assert.equal(entry.sni, 'edition.cnn.com');
  await nginx.stop();
});

test('mutual TLS origination at the egress gateway with credentialName', async () => {
  const [pNginx, pGw] = await freePorts(2) as [number, number];
  const nginx = await startNginx({ http: nginxTlsServer({ port: pNginx, cert: nginxCert.cert, key: nginxCert.key, serverName: '_', clientCa: ca.cert, verifyClient: 'on' }) });
  nginxes.push(nginx);
  const cfg = path.join(dir, 'mutual');
  await import('node:fs/promises').then((f) => f.mkdir(cfg));
  await writeFile(path.join(cfg, 'task.yaml'), `apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: istio-egressgateway
  namespace: istio-system
spec:
  selector:
    istio: egressgateway
  servers:
  - port:
      number: ${pGw}
      name: https
      protocol: HTTPS
    hosts:
    - my-nginx.mesh-external.svc.cluster.local
    tls:
      mode: ISTIO_MUTUAL
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: egressgateway-for-nginx
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: nginx
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
      portLevelSettings:
      - port:
          number: ${pGw}
        tls:
          mode: ISTIO_MUTUAL
          sni: my-nginx.mesh-external.svc.cluster.local
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: direct-nginx-through-egress-gateway
spec:
  hosts:
  - my-nginx.mesh-external.svc.cluster.local
  gateways:
  - istio-system/istio-egressgateway
  - mesh
  http:
  - match:
    - gateways:
      - mesh
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: nginx
        port:
          number: ${pGw}
      weight: 100
  - match:
    - gateways:
      - istio-system/istio-egressgateway
      port: ${pGw}
    route:
    - destination:
        host: my-nginx.mesh-external.svc.cluster.local
        port:
          number: 443
      weight: 100
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: originate-mtls-for-nginx
  namespace: istio-system
spec:
  host: my-nginx.mesh-external.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    portLevelSettings:
    - port:
        number: 443
      tls:
        mode: MUTUAL
        credentialName: client-credential # this must match the secret created earlier to hold client certs
        sni: my-nginx.mesh-external.svc.cluster.local
---
${writeSecretYaml('client-credential', 'istio-system', 'Opaque', { 'tls.key': client.keyPem, 'tls.crt': client.certPem, 'ca.crt': ca.certPem })}
---
# The task's nginx Service, and where the egress gateway runs, as ServiceEntries.
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: my-nginx
  namespace: mesh-external
spec:
  hosts: [my-nginx.mesh-external.svc.cluster.local]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS, targetPort: ${pNginx}}
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: istio-egressgateway
  namespace: istio-system
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: ${pGw}, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`);
  const { outbound, egress } = await mesh(cfg, []);
  const r = await curl(['-x', `http://127.0.0.1:${outbound}`, 'http://my-nginx.mesh-external.svc.cluster.local/']);
  assert.equal(r.status, 200, r.body);
  const j = JSON.parse(r.body);
  assert.equal(j.ssl_client_verify, 'SUCCESS');
  assert.match(j.ssl_client_s_dn, /CN=client\.example\.com/);
  assert.equal(j.ssl_server_name, 'my-nginx.mesh-external.svc.cluster.local');
  const entry = await egress.waitForAccessLog((e) => e.authority === 'my-nginx.mesh-external.svc.cluster.local' && e.status === 200);
  assert.equal(entry.upstreamCluster, 'outbound|443||my-nginx.mesh-external.svc.cluster.local');
});
