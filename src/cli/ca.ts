/**
 * `tlsgate ca`: the mesh certificate authority.
 *   ca init         create a root CA and token secret in a directory
 *   ca token        print a bootstrap token granting one namespace/service account
 *   ca serve        sign workload CSRs over HTTPS
 *   ca rotate-root  new signing root, old one kept in the trust bundle
 * The mesh code is imported when a command runs, so other commands do not pay for it.
 */
import { Command, InvalidArgumentError, Option } from 'commander';

function durationMs(name: string) {
  return (v: string): number => {
    const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(v.trim());
    const ms = m ? Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? 's') as 'ms']) : NaN;
    if (!(ms >= 1000)) throw new InvalidArgumentError(`${name} must be a duration of at least 1s, such as 30s, 15m, 24h or 7d`);
    return ms;
  };
}

function port(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('--port must be an integer 0-65535');
  return n;
}

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

const fail = (e: unknown): number => {
  process.stderr.write(`tlsgate ca: ${(e as Error).message}\n`);
  return 1;
};

export async function caInit(o: { dir: string; trustDomain: string; force?: boolean }): Promise<number> {
  const { initCaDir, CA_FILES } = await import('../mesh/ca.js');
  try {
    const meta = await initCaDir(o.dir, { trustDomain: o.trustDomain, force: o.force });
    process.stdout.write(
      `created a mesh CA for trust domain ${meta.trustDomain} in ${o.dir}\n` +
      `  root certificate  ${CA_FILES.rootCert} (SHA-256 ${meta.rootFingerprintSha256})\n` +
      `  root key          ${CA_FILES.rootKey} (0600: keep it on this host only)\n` +
      `  token secret      ${CA_FILES.tokenSecret} (0600)\n` +
      `next: tlsgate ca serve --dir ${o.dir}   or   tlsgate ca token --dir ${o.dir} --namespace <ns> --service-account <sa>\n`,
    );
    return 0;
  } catch (e) {
    return fail(e);
  }
}

export async function caToken(o: { dir: string; namespace: string; serviceAccount: string; ttl: number }): Promise<number> {
  const { MeshCa } = await import('../mesh/ca.js');
  const { identityError } = await import('../mesh/spiffe.js');
  try {
    const ca = await MeshCa.load(o.dir);
    const bad = identityError(ca.trustDomain, o.namespace, o.serviceAccount);
    if (bad) throw new Error(bad);
    // The token alone on stdout, so `TOKEN=$(tlsgate ca token ...)` works.
    process.stdout.write(ca.mintToken(o.namespace, o.serviceAccount, o.ttl) + '\n');
    return 0;
  } catch (e) {
    return fail(e);
  }
}

export async function caRotateRoot(o: { dir: string }): Promise<number> {
  const { rotateRoot } = await import('../mesh/ca.js');
  try {
    const r = await rotateRoot(o.dir);
    process.stdout.write(
      `new signing root SHA-256 ${r.current}\n` +
      `previous root ${r.previous} kept in roots-extra.pem: workloads trust both while they renew.\n` +
      `restart \`tlsgate ca serve\`; once every workload has renewed, remove the old root from roots-extra.pem.\n`,
    );
    return 0;
  } catch (e) {
    return fail(e);
  }
}

export async function caServe(o: { dir: string; port: number; address: string; workloadCertTtl: number; san: string[] }): Promise<number> {
  const [{ MeshCa }, { startCaServer }, { default: pino }] = await Promise.all([
    import('../mesh/ca.js'),
    import('../mesh/ca-server.js'),
    import('pino'),
  ]);
  const log = pino({ base: null, messageKey: 'msg' }, pino.destination({ dest: 2, sync: true }));
  let server: Awaited<ReturnType<typeof startCaServer>>;
  try {
    const ca = await MeshCa.load(o.dir);
    server = await startCaServer({ ca, port: o.port, address: o.address, workloadCertTtlMs: o.workloadCertTtl, extraSans: o.san, logger: log });
    log.info({ url: server.url, trustDomain: ca.trustDomain, workloadCertTtlSeconds: o.workloadCertTtl / 1000 }, 'CA serving POST /v1/sign');
  } catch (e) {
    return fail(e);
  }
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await server.close();
  log.info({}, 'CA stopped');
  return 0;
}

/** Adds the `ca` command group to the program. */
export function registerCaCommands(program: Command): void {
  const ca = program.command('ca').description('the mesh certificate authority: SPIFFE workload certificates for mTLS');

  ca.command('init')
    .description('create a root CA (EC P-256) and a token-signing secret in a directory (mode 0700)')
    .requiredOption('--dir <dir>', 'CA directory')
    .option('--trust-domain <domain>', 'SPIFFE trust domain', 'cluster.local')
    .option('--force', 'replace an existing CA (every certificate and token issued before stops working)')
    .action(async (o) => {
      process.exitCode = await caInit({ dir: o.dir, trustDomain: o.trustDomain, force: o.force });
    });

  ca.command('token')
    .description('print a bootstrap token that grants exactly one namespace/service account')
    .requiredOption('--dir <dir>', 'CA directory')
    .requiredOption('--namespace <ns>', 'namespace of the identity')
    .requiredOption('--service-account <sa>', 'service account of the identity')
    .addOption(new Option('--ttl <duration>', 'how long the token is accepted (e.g. 1h, 7d)').argParser(durationMs('--ttl')).default(3_600_000, '1h'))
    .action(async (o) => {
      process.exitCode = await caToken({ dir: o.dir, namespace: o.namespace, serviceAccount: o.serviceAccount, ttl: o.ttl });
    });

  ca.command('serve')
    .description('sign workload CSRs over HTTPS: POST /v1/sign {csr, token} -> {certChain, rootCerts}')
    .requiredOption('--dir <dir>', 'CA directory')
    .option('--port <port>', 'listen port', port, 15012)
    .option('--address <addr>', 'listen address', '127.0.0.1')
    .addOption(new Option('--workload-cert-ttl <duration>', 'longest workload certificate lifetime (e.g. 24h, 20s)').argParser(durationMs('--workload-cert-ttl')).default(86_400_000, '24h'))
    .option('--san <name>', 'another DNS name or IP for the serving certificate (repeatable)', collect, [] as string[])
    .action(async (o) => {
      process.exitCode = await caServe({ dir: o.dir, port: o.port, address: o.address, workloadCertTtl: o.workloadCertTtl, san: o.san });
    });

  ca.command('rotate-root')
    .description('make a new signing root and keep trusting the old one (roots-extra.pem) while workloads renew')
    .requiredOption('--dir <dir>', 'CA directory')
    .action(async (o) => {
      process.exitCode = await caRotateRoot({ dir: o.dir });
    });
}
