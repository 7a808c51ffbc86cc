/**
 * credentialName resolution, as istiod does it:
 * - `foo`, `kubernetes://foo`: Secret `foo` in the proxy's namespace, then (tlsgate extension,
 *   documented) in the namespace of the resource that names it; `kubernetes://ns/foo` names one.
 * - keys: `cert`+`key` (generic) win when both are non-empty, else `tls.crt`+`tls.key`;
 *   the Secret `type` is not checked.
 * - CA: a Secret literally named `<name>-cacert` wins (its `cacert`, else `ca.crt`); otherwise
 *   the main Secret's `cacert`, else `ca.crt`. CRL: `crl`, else `ca.crl`.
 * File paths in Istio resources are resolved against the directory of the file that declared
 * the resource when they are relative (so examples can ship their certificates).
 */
import * as path from 'node:path';
import type { SecretResource } from '../../config/resource.js';
import type { TranslateContext, Locatable } from './context.js';

export interface CredentialRefs {
  /** Secret name of the cert chain + key, when the credential holds one. */
  certificate?: string;
  /** Secret name of the CA bundle, when one was found. */
  ca?: string;
  crl?: string;
}

function text(b: Buffer | undefined): string | undefined {
  if (!b || b.length === 0) return undefined;
  return b.toString('utf8');
}

export function findSecret(ctx: TranslateContext, ref: string, resourceNs: string): SecretResource | undefined {
  let name = ref;
  let namespaces = [ctx.options.proxyNamespace, resourceNs];
  if (ref.startsWith('kubernetes://')) {
    name = ref.slice('kubernetes://'.length);
    const i = name.indexOf('/');
    if (i >= 0) {
      namespaces = [name.slice(0, i)];
      name = name.slice(i + 1);
    }
  }
  for (const ns of namespaces) {
    const s = ctx.resources.secrets.find((x) => x.metadata.name === name && x.metadata.namespace === ns);
    if (s) return s;
  }
  return undefined;
}

/**
 * Resolves a credentialName into snapshot secrets. Reports TG3003/TG3004 at `fieldPath` of `owner`.
 * `need`: what the caller requires (a cert+key, a CA, or both).
 */
export function resolveCredential(
  ctx: TranslateContext, owner: Locatable, fieldPath: string, ref: string,
  need: { certificate: boolean; ca: boolean },
): CredentialRefs | undefined {
  const ownerNs = owner.metadata.namespace;
  const secret = findSecret(ctx, ref, ownerNs);
  if (!secret) {
    ctx.error('TG3003', owner, fieldPath, `Secret "${ref}" not found in namespace "${ctx.options.proxyNamespace}" (the proxy's) or "${ownerNs}"`,
      'add a v1 Secret with tls.crt/tls.key (or cert/key) to the config, or fix the name (tlsgate reads Secrets from its config; reading them from the Kubernetes API is not supported yet)');
    return undefined;
  }
  const ns = secret.metadata.namespace;
  const base = `kubernetes://${ns}/${secret.metadata.name}`;
  const out: CredentialRefs = {};
  const d = secret.data;
  if (need.certificate) {
    let cert = text(d['cert']), key = text(d['key']);
    if (!(cert && key)) { cert = text(d['tls.crt']); key = text(d['tls.key']); }
    if (!(cert && key)) {
      const found = Object.keys(d).sort().join(', ') || '(none)';
      ctx.error('TG3004', owner, fieldPath, `Secret ${ns}/${secret.metadata.name} has no certificate and key: expected keys (cert and key) or (tls.crt and tls.key); found: ${found}`);
      return undefined;
    }
    out.certificate = ctx.addSecret({ name: base, source: { kind: 'inline', certChain: cert, privateKey: key }, origin: { resource: { kind: 'Secret', namespace: ns, name: secret.metadata.name }, path: 'data' } });
  }
  // CA: the companion `<name>-cacert` Secret wins over the CA inside the main Secret.
  const companion = ctx.resources.secrets.find((x) => x.metadata.name === `${secret.metadata.name}-cacert` && x.metadata.namespace === ns);
  const caFrom = companion && (text(companion.data['cacert']) ?? text(companion.data['ca.crt'])) ? companion : secret;
  const ca = text(caFrom.data['cacert']) ?? text(caFrom.data['ca.crt']);
  const crl = text(caFrom.data['crl']) ?? text(caFrom.data['ca.crl']) ?? text(secret.data['crl']) ?? text(secret.data['ca.crl']);
  if (ca) {
    out.ca = ctx.addSecret({ name: `${base}-cacert`, source: { kind: 'inline', ca }, origin: { resource: { kind: 'Secret', namespace: ns, name: caFrom.metadata.name }, path: 'data' } });
  } else if (need.ca) {
    ctx.error('TG3004', owner, fieldPath, `no CA bundle for "${ref}": expected key cacert or ca.crt in Secret ${ns}/${secret.metadata.name}, or a Secret ${ns}/${secret.metadata.name}-cacert`,
      'MUTUAL and OPTIONAL_MUTUAL need the CA that signs client certificates');
    return undefined;
  }
  if (crl) out.crl = ctx.addSecret({ name: `${base}-crl`, source: { kind: 'inline', crl } });
  return out;
}

/** Resolves a file path from a resource against the directory of its file when relative. */
export function resolvePath(owner: Locatable, p: string): string {
  if (path.isAbsolute(p)) return p;
  const file = owner.locate('').file;
  return path.resolve(path.dirname(file), p);
}

export function fileSecret(ctx: TranslateContext, owner: Locatable, files: { cert?: string; key?: string; ca?: string; crl?: string }): string {
  const src: { kind: 'file'; certChainPath?: string; privateKeyPath?: string; caPath?: string; crlPath?: string } = { kind: 'file' };
  if (files.cert) src.certChainPath = resolvePath(owner, files.cert);
  if (files.key) src.privateKeyPath = resolvePath(owner, files.key);
  if (files.ca) src.caPath = resolvePath(owner, files.ca);
  if (files.crl) src.crlPath = resolvePath(owner, files.crl);
  const name = 'file://' + [src.certChainPath, src.privateKeyPath, src.caPath, src.crlPath].map((x) => x ?? '').join('|');
  return ctx.addSecret({ name, source: src });
}
