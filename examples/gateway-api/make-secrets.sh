#!/bin/sh
# Writes secrets.yaml (the certificateRefs of gateway.yaml) from the quickstart's certificates.
# Run `npm start` once first so that ../quickstart/certs exists.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
certs="$here/../quickstart/certs"
b64() { base64 < "$1" | tr -d '\n'; }
secret() { # name crt key [ca]
  printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: istio-system\ntype: kubernetes.io/tls\ndata:\n' "$1"
  printf '  tls.crt: %s\n  tls.key: %s\n' "$(b64 "$2")" "$(b64 "$3")"
  if [ $# -ge 4 ]; then printf '  ca.crt: %s\n' "$(b64 "$4")"; fi
}
{
  secret app-cert "$certs/app.example.local.crt" "$certs/app.example.local.key"
  echo '---'
  secret mtls-cert "$certs/mtls.example.local.crt" "$certs/mtls.example.local.key" "$certs/ca.crt"
} > "$here/secrets.yaml"
echo "wrote $here/secrets.yaml"
