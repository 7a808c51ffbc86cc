// Builds the optional native relay (build/Release/relay.node) with node-gyp, from
// `npm run build:native` (run by `prepare`). Never fails the install: when the addon cannot be
// built (no compiler, not Linux, no Node headers), tlsgate uses its JS relay and this prints
// one line saying so. TLSGATE_NO_NATIVE=1 skips the build.
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const notice = (why) => {
  console.log(`tlsgate: native relay not built (${why}); the JS relay will be used`);
  process.exit(0);
};

if (process.env.TLSGATE_NO_NATIVE === '1') notice('TLSGATE_NO_NATIVE=1');

// `npm test` calls this too: an addon newer than its sources is left as it is.
const built = path.join(root, 'build', 'Release', 'relay.node');
const mtime = (f) => (existsSync(f) ? statSync(f).mtimeMs : Infinity);
if (process.env.TLSGATE_NATIVE_REBUILD !== '1' && existsSync(built)
  && ['native/relay.c', 'native/client_hello.c', 'native/fast_route.c', 'native/client_hello.h', 'native/fast_route.h', 'binding.gyp'].every((f) => mtime(path.join(root, f)) < mtime(built))) {
  console.log('tlsgate: native relay up to date (build/Release/relay.node)');
  process.exit(0);
}
if (process.platform !== 'linux') notice(`splice(2) is Linux-only, this is ${process.platform}`);

// npm names its own node-gyp in scripts' environment; run by hand, use the one npm bundles.
const prefix = path.resolve(path.dirname(process.execPath), '..');
const bundled = path.join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const gyp = process.env.npm_config_node_gyp ?? (existsSync(bundled) ? bundled : undefined);
const cmd = gyp ? process.execPath : 'node-gyp';
const args = gyp ? [gyp] : [];
args.push('rebuild', '--loglevel=warn');
// Build against the headers of the Node that runs this, when they are installed beside it and
// npm did not name a directory: node-gyp would otherwise try to download them.
if (!process.env.npm_config_nodedir && existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${prefix}`);

const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 300_000 });
if (r.status !== 0 || !existsSync(path.join(root, 'build', 'Release', 'relay.node'))) {
  const detail = r.error?.message ?? (r.stderr ?? '').split('\n').map((l) => l.trim()).find((l) => /error/i.test(l));
  rmSync(path.join(root, 'build'), { recursive: true, force: true });
  notice(detail ? detail.slice(0, 200) : `node-gyp exited with ${r.status ?? r.signal}`);
}
console.log('tlsgate: native relay built (build/Release/relay.node)');
