#!/usr/bin/env bash
# The whole mesh on one machine: a CA, two sidecars (sleep -> httpbin), an egress gateway, and a
# stand-in for edition.cnn.com with its own CA. Prints what to try, then runs until Ctrl-C.
#
#   npx tsc -p .            # once, from the repository root
#   examples/mesh/run.sh    # WORKLOAD_CERT_TTL=20s to watch rotation; WORK=/some/dir to keep files
#
# Ports (all on 127.0.0.1):
#   15001  sleep sidecar outbound proxy (the app's HTTP_PROXY / HTTPS_PROXY)
#   15006  httpbin sidecar inbound (mesh mTLS, PeerAuthentication)
#   18080  httpbin app (plaintext, only the sidecar should talk to it)
#   15443  egress gateway (ISTIO_MUTUAL)
#   18443  "edition.cnn.com" (TLS, its own CA)
#   15100 / 15200 / 15300  admin ports of sleep / httpbin / egress gateway
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MAIN="$ROOT/dist/src/cli/main.js"
[ -f "$MAIN" ] || { echo "build first: (cd $ROOT && npx tsc -p .)" >&2; exit 1; }
TTL="${WORKLOAD_CERT_TTL:-1h}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/tlsgate-mesh.XXXXXX")}"
mkdir -p "$WORK/certs"
cp -r "$HERE/config" "$WORK/config"
tlsgate() { node "$MAIN" "$@"; }
# Background proxies run node directly (not through the function) so $! is the proxy itself.

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== working directory: $WORK"

# 1. The mesh CA (root key stays in $WORK/ca).
tlsgate ca init --dir "$WORK/ca" >/dev/null

# 2. edition.cnn.com's own CA and certificate (nothing to do with the mesh).
openssl req -x509 -sha256 -nodes -days 30 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -subj '/O=cnn stand-in root/CN=cnn stand-in root' -keyout "$WORK/certs/cnn-ca.key" -out "$WORK/certs/cnn-ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=edition.cnn.com' \
  -keyout "$WORK/certs/cnn.key" -out "$WORK/certs/cnn.csr" 2>/dev/null
printf 'subjectAltName=DNS:edition.cnn.com\n' > "$WORK/certs/cnn.ext"
openssl x509 -req -sha256 -days 30 -CA "$WORK/certs/cnn-ca.crt" -CAkey "$WORK/certs/cnn-ca.key" -set_serial 443 \
  -in "$WORK/certs/cnn.csr" -extfile "$WORK/certs/cnn.ext" -out "$WORK/certs/cnn.crt" 2>/dev/null

# 3. The apps: httpbin (echoes what it received, XFCC included) and the edition.cnn.com stand-in
#    (echoes the SNI and TLS version of the session it terminated).
node --input-type=module -e "
  const m = await import('$ROOT/dist/src/cli/echo-upstream.js');
  await m.startEchoUpstream(18080);
" >"$WORK/httpbin.log" 2>&1 &
PIDS+=($!)
CNN_CERT="$WORK/certs/cnn.crt" CNN_KEY="$WORK/certs/cnn.key" node --input-type=module -e "
  import https from 'node:https';
  import { readFileSync } from 'node:fs';
  https.createServer({ cert: readFileSync(process.env.CNN_CERT), key: readFileSync(process.env.CNN_KEY) }, (req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ site: 'edition.cnn.com stand-in', path: req.url, sni: req.socket.servername,
      tls: req.socket.getProtocol(), cipher: req.socket.getCipher().name }) + '\n');
  }).listen(18443, '127.0.0.1');
" >"$WORK/cnn.log" 2>&1 &
PIDS+=($!)

# 4. The proxies. Every one gets a SPIFFE certificate from the CA directory.
common=(--config "$WORK/config" --bind-address 127.0.0.1 --ca-dir "$WORK/ca" --workload-cert-ttl "$TTL" --drain-grace 0)
node "$MAIN" run "${common[@]}" --sidecar --namespace foo --service-account httpbin --labels app=httpbin \
  --inbound-port 15006 --app-port 18080 --outbound-port 15101 --admin-port 15200 >"$WORK/httpbin-sidecar.log" 2>&1 &
PIDS+=($!)
node "$MAIN" run "${common[@]}" --sidecar --namespace default --service-account sleep --labels app=sleep \
  --outbound-port 15001 --admin-port 15100 >"$WORK/sleep-sidecar.log" 2>&1 &
PIDS+=($!)
node "$MAIN" run "${common[@]}" --labels istio=egressgateway --namespace istio-system \
  --service-account istio-egressgateway-service-account --admin-port 15300 >"$WORK/egress-gateway.log" 2>&1 &
PIDS+=($!)

for port in 15100 15200 15300; do
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$port/ready" >/dev/null || { echo "a proxy did not start; see $WORK/*.log" >&2; exit 1; }
done

cat <<EOF

== the mesh is up (logs: $WORK/*.log)

1. sleep -> httpbin over mesh mTLS (auto mTLS from the endpoint label). httpbin sees both identities:
     curl -x http://127.0.0.1:15001 http://httpbin.foo.svc.cluster.local:8000/headers
   look for  x-forwarded-client-cert: By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=...;Subject="";URI=spiffe://cluster.local/ns/default/sa/sleep

2. What the httpbin sidecar presents (its SPIFFE certificate, signed by the mesh root):
     openssl s_client -connect 127.0.0.1:15006 -alpn istio -CAfile $WORK/ca/root-cert.pem </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName

3. PeerAuthentication, applied live (the config directory is watched):
     curl http://127.0.0.1:15006/plain                               # PERMISSIVE (default): plaintext accepted
     cp $HERE/policies/strict.yaml $WORK/config/                     # mesh-wide STRICT
     curl http://127.0.0.1:15006/plain                               # now: connection closed
     curl -x http://127.0.0.1:15001 http://httpbin.foo.svc.cluster.local:8000/headers   # mTLS still works
     cp $HERE/policies/port-level.yaml $WORK/config/                 # STRICT, but port 18080 PERMISSIVE
     rm $WORK/config/strict.yaml $WORK/config/port-level.yaml        # back to PERMISSIVE
   what the sidecar counted:
     curl -s http://127.0.0.1:15200/stats/prometheus | grep -E 'tls_handshakes_total|tls_inspector|refused'

4. Double encryption: the app's own TLS inside mTLS, through the egress gateway:
     curl -x http://127.0.0.1:15001 --cacert $WORK/certs/cnn-ca.crt https://edition.cnn.com/politics
   the egress gateway logs the sleep sidecar's SPIFFE ID (peerUriSan) but never sees the HTTP request:
     grep peerUriSan $WORK/egress-gateway.log | tail -1
   and without a mesh certificate nothing gets through:
     curl -k --resolve edition.cnn.com:15443:127.0.0.1 https://edition.cnn.com:15443/politics

5. Rotation: restart with WORKLOAD_CERT_TTL=20s and watch 'workload certificate rotated' in the logs;
   the serial printed by step 2 changes every ~10 s while open connections carry on.

Ctrl-C stops everything.
EOF
wait
