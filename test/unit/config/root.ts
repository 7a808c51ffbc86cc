import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function isRoot(d: string): boolean {
  return existsSync(join(d, 'tsconfig.json')) && existsSync(join(d, 'src')) && existsSync(join(d, 'test'));
}

/**
 * The repository root: the nearest directory above this compiled file that holds tsconfig.json,
 * src/ and test/; else the working directory (for builds placed outside the tree).
 */
export function repoRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 10; i++) {
    if (isRoot(d)) return d;
    d = dirname(d);
  }
  if (isRoot(process.cwd())) return process.cwd();
  throw new Error('repository root not found: run the tests from the repository root');
}
