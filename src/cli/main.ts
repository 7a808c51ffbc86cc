/**
 * The tlsgate command line: run, validate, demo.
 */
import { Command, Option, InvalidArgumentError } from 'commander';
import { availableParallelism } from 'node:os';
// Commands are imported when they run: `validate` should not pay for the data plane's modules.

function int(name: string) {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError(`${name} must be an integer 0-65535`);
    return n;
  };
}

function count(name: string) {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1 || n > 100_000_000) throw new InvalidArgumentError(`${name} must be a positive integer`);
    return n;
  };
}

function duration(v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(v.trim());
  if (!m) throw new InvalidArgumentError('expected a duration such as 500ms, 5s or 1m');
  const n = Number(m[1]);
  return m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : m[2] === 'h' ? n * 3_600_000 : n * 1000;
}

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

const program = new Command();
program
  .name('tlsgate')
  .description('A TLS gateway and sidecar proxy that implements Istio\'s TLS traffic model and reads Istio YAML.')
  .version('0.1.0');

program.command('run')
  .description('load, validate and serve a configuration')
  .requiredOption('-c, --config <path>', 'file or directory of Istio YAML/JSON (repeatable)', collect, [] as string[])
  .option('--admin-port <port>', 'admin server port', int('--admin-port'), 15000)
  .option('--admin-address <addr>', 'admin server address (privileged: keep it on loopback)', '127.0.0.1')
  .option('--bind-address <addr>', 'address listeners bind unless a server sets bind (default 0.0.0.0; 127.0.0.1 for --sidecar)')
  .option('--sidecar', 'run as a sidecar: serve the mesh (VirtualServices bound to mesh, ServiceEntries) instead of Gateways')
  .option('--outbound-port <port>', 'sidecar: the HTTP proxy port the app uses through HTTP_PROXY/HTTPS_PROXY', int('--outbound-port'), 15001)
  .option('--inbound-port <port>', 'sidecar: the port that terminates mesh mTLS for the app', int('--inbound-port'), 15006)
  .option('--app-port <port>', 'sidecar: the app\'s plaintext port on 127.0.0.1 (enables the inbound side)', int('--app-port'))
  .option('--service-account <sa>', 'mesh identity: the service account (with --namespace)', 'default')
  .option('--ca-dir <dir>', 'mesh identity: sign workload certificates locally from this CA directory')
  .option('--ca-url <url>', 'mesh identity: a `tlsgate ca serve` URL')
  .option('--ca-token <token>', 'mesh identity: the bootstrap token from `tlsgate ca token`')
  .option('--ca-root <file>', 'mesh identity: the CA root that signs the CA server\'s certificate')
  .option('--workload-cert-ttl <duration>', 'mesh identity: requested certificate lifetime', duration)
  .option('--labels <k=v,...>', 'this proxy\'s workload labels: serve only Gateways whose selector matches')
  .option('--namespace <ns>', 'the proxy\'s own namespace (credentialName Secrets are looked up here first)', 'istio-system')
  .option('--access-log <where>', 'stdout, off, or a file path', 'stdout')
  .addOption(new Option('--log-level <level>', 'operational log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
  .option('--drain-grace <duration>', 'after SIGTERM, keep accepting this long while /ready is 503', duration, 5000)
  .option('--drain-timeout <duration>', 'then give open connections this long before closing them', duration, 30000)
  .option('--client-hello-timeout <duration>', 'how long to wait for a ClientHello', duration, 15000)
  .option('--handshake-timeout <duration>', 'how long a downstream TLS handshake may take after the ClientHello', duration, 10000)
  .option('--request-headers-timeout <duration>', 'HTTP/1.1: the request headers must arrive within this (408 beyond)', duration, 10000)
  .option('--max-connections <n>', 'open connections per listener; more are closed at once (listener_overflow)', count('--max-connections'), 100000)
  .option('--max-request-header-bytes <n>', 'request header block size (431 beyond)', count('--max-request-header-bytes'), 16384)
  .option('--max-request-headers <n>', 'request header fields (431 beyond)', count('--max-request-headers'), 100)
  .addOption(new Option('--relay <relay>', 'raw TCP relay for passthrough and TCP routes: native (addon, bytes never enter JS), js (stream pipes), auto = native when built').choices(['auto', 'native', 'js']).default('auto'))
  .option('--no-watch', 'do not watch the config paths and certificate files for changes (SIGHUP still reloads)')
  .option('--etcd-ca <file>', 'etcd (--config etcd://host:2379/<prefix>): CA bundle that signs the etcd server certificate; turns TLS on')
  .option('--etcd-cert <file>', 'etcd: client certificate (PEM) for mTLS; turns TLS on')
  .option('--etcd-key <file>', 'etcd: client private key (PEM) for mTLS')
  .option('--etcd-user <name>', 'etcd: user for password auth')
  .option('--etcd-password <password>', 'etcd: password (prefer the TLSGATE_ETCD_PASSWORD environment variable: arguments show in ps)')
  .option('--workers <n>', 'worker processes sharing the listeners ("auto" = one per core; 1 = this process serves)', (v: string) => {
    if (v === 'auto') return availableParallelism();
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1 || n > 256) throw new InvalidArgumentError('--workers must be an integer 1-256 or "auto"');
    return n;
  }, availableParallelism())
  .action(async (o) => {
    const { runCommand } = await import('./run.js');
    process.exitCode = await runCommand({
      config: o.config, adminPort: o.adminPort, adminAddress: o.adminAddress,
      bindAddress: o.bindAddress ?? (o.sidecar ? '127.0.0.1' : '0.0.0.0'),
      sidecar: o.sidecar === true, outboundPort: o.outboundPort, inboundPort: o.inboundPort, appPort: o.appPort,
      serviceAccount: o.serviceAccount, caDir: o.caDir, caUrl: o.caUrl, caToken: o.caToken, caRoot: o.caRoot,
      workloadCertTtlMs: o.workloadCertTtl,
      labels: o.labels, namespace: o.namespace, accessLog: o.accessLog, logLevel: o.logLevel,
      drainGraceMs: o.drainGrace, drainTimeoutMs: o.drainTimeout, clientHelloTimeoutMs: o.clientHelloTimeout,
      limits: {
        maxConnections: o.maxConnections, handshakeTimeoutMs: o.handshakeTimeout, requestHeadersTimeoutMs: o.requestHeadersTimeout,
        maxRequestHeaderBytes: o.maxRequestHeaderBytes, maxRequestHeaders: o.maxRequestHeaders,
      },
      watch: o.watch, workers: o.workers, etcd: etcdOptionsFrom(o), relay: o.relay,
    });
  });

const { addEtcdOptions, etcdOptionsFrom } = await import('./config-cmd.js');

addEtcdOptions(program.command('validate'))
  .description('check a configuration offline; exit 0 when it has no error')
  .requiredOption('-c, --config <path>', 'file or directory (repeatable)', collect, [] as string[])
  .option('--namespace <ns>', 'the proxy\'s namespace for credentialName lookups', 'istio-system')
  .option('--labels <k=v,...>', 'validate as a proxy with these workload labels')
  .option('-q, --quiet', 'do not print info notices (skipped documents)')
  .action(async (o) => {
    const { validateCommand } = await import('./validate.js');
    process.exitCode = await validateCommand({ config: o.config, namespace: o.namespace, labels: o.labels, quiet: o.quiet, etcd: etcdOptionsFrom(o) });
  });

addEtcdOptions(program.command('explain'))
  .description('show the path a connection would take: listener, filter chain, TLS, route, cluster (exit 0 matched, 1 no match, 2 bad input)')
  .argument('[target]', 'https://host[:port]/path, http://host[:port]/path, tcp://host:port or tls://host:port')
  .requiredOption('-c, --config <path>', 'file or directory (repeatable)', collect, [] as string[])
  .option('--namespace <ns>', 'the proxy\'s namespace for credentialName lookups', 'istio-system')
  .option('--labels <k=v,...>', 'explain as a proxy with these workload labels')
  .option('--json', 'print a JSON object instead of text')
  .option('--sni <name>', 'SNI the client sends (overrides the URL host)')
  .option('--port <port>', 'port the client connects to (overrides the URL port)', int('--port'))
  .option('--alpn <protocols>', 'ALPN the client offers, comma-separated (https default: h2,http/1.1)')
  .option('--header <k=v>', 'request header (repeatable; host=... sets the Host)', collect, [] as string[])
  .option('--method <method>', 'request method (default GET)')
  .option('--path <path>', 'request path (default: from the URL, else /)')
  .option('--address <addr>', 'listener address, when several listeners share the port')
  .option('--plaintext', 'with --port and no target: the client sends plaintext, not a ClientHello')
  .option('--sidecar', 'explain as a sidecar (as `run --sidecar`): a URL is what the app sends through HTTP_PROXY/HTTPS_PROXY; no URL = a peer at the inbound port')
  .option('--outbound-port <port>', 'sidecar: the outbound proxy port', int('--outbound-port'))
  .option('--inbound-port <port>', 'sidecar: the inbound mTLS port', int('--inbound-port'))
  .option('--app-port <port>', 'sidecar: the app port the inbound side serves (enables the inbound side)', int('--app-port'))
  .option('--service-account <sa>', 'sidecar: the proxy\'s service account (its SPIFFE identity, with --namespace)')
  .exitOverride((e) => process.exit(e.exitCode === 0 ? 0 : 2))
  .action(async (target: string | undefined, o) => {
    const { explainCommand } = await import('./explain.js');
    process.exitCode = await explainCommand(target, { ...o, config: o.config, namespace: o.namespace, etcd: etcdOptionsFrom(o) });
  });

program.command('demo')
  .description('run the demo: every TLS mode (termination, passthrough, origination, sidecar mTLS, TLS inside mTLS) on examples/demo/ with generated certificates, built-in upstreams and the dashboard')
  .option('--admin-port <port>', 'admin server port', int('--admin-port'), 15000)
  .action(async (o) => {
    const { demoCommand } = await import('./demo.js');
    process.exitCode = await demoCommand({ adminPort: o.adminPort });
  });

// `ca init | token | serve | rotate-root`: the mesh CA (src/cli/ca.ts loads the mesh code lazily).
(await import('./ca.js')).registerCaCommands(program);
// `config push | get | diff`: share a configuration through etcd (src/cli/config-cmd.ts).
(await import('./config-cmd.js')).registerConfigCommands(program);

program.parseAsync(process.argv).catch((e: Error) => {
  process.stderr.write(`tlsgate: ${e.message}\n`);
  process.exitCode = 2;
});
