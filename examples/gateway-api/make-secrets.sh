#!/bin/sh
# Gateway API takes certificates from Secrets (certificateRefs) and CAs from ConfigMaps
# (caCertificateRefs), where the Istio examples name PEM files. This writes them from the PEM files:
#   quickstart-secrets.yaml  from ../quickstart/certs  (for quickstart.yaml)
#   demo-secrets.yaml        from ../demo/certs        (for demo-ingress.yaml and demo-egress.yaml)
# Run `npm start` once first: the demo generates ../demo/certs on its first run.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
b64() { base64 < "$1" | tr -d '\n'; }
secret() { # name crt key [ca]
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: istio-system\ntype: kubernetes.io/tls\ndata:\n' "$1"
  printf '  tls.crt: %s\n  tls.key: %s\n' "$(b64 "$2")" "$(b64 "$3")"
  if [ $# -ge 4 ]; then printf '  ca.crt: %s\n' "$(b64 "$4")"; fi
}
configmap() { # name ca
  printf -- '---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: %s\n  namespace: istio-system\ndata:\n  ca.crt: |\n' "$1"
  sed 's/^/    /' "$2"
}
wrote=0
certs="$here/../quickstart/certs"
if [ -f "$certs/ca.crt" ]; then
  {
    secret app-cert "$certs/app.example.local.crt" "$certs/app.example.local.key"
    secret mtls-cert "$certs/mtls.example.local.crt" "$certs/mtls.example.local.key" "$certs/ca.crt"
  } > "$here/quickstart-secrets.yaml"
  echo "wrote $here/quickstart-secrets.yaml"; wrote=1
fi
certs="$here/../demo/certs"
if [ -f "$certs/ca.crt" ]; then
  {
    secret app-cert "$certs/app.example.local.crt" "$certs/app.example.local.key"
    secret mtls-cert "$certs/mtls.example.local.crt" "$certs/mtls.example.local.key"
    configmap demo-ca "$certs/ca.crt"            # clients of mtls.example.local; the secure app's CA
    secret client-cert "$certs/client.crt" "$certs/client.key"
  } > "$here/demo-secrets.yaml"
  echo "wrote $here/demo-secrets.yaml"; wrote=1
fi
if [ "$wrote" = 0 ]; then echo "no certificates found: run \`npm start\` once first" >&2; exit 1; fi
