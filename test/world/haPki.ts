/**
 * Throw-away PKI for the HA guest, made with the machine's `openssl`: one CA for etcd (server certificates
 * per member, a client certificate for the API servers and the operator) and one for Kubernetes (the API
 * servers' serving certificates, valid for each controller's address and the load balancer's).
 */
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface CertFiles {
  cert: string;
  key: string;
}

export interface Ca extends CertFiles {
  issue(name: string, opts: { cn: string; ips?: string[]; dns?: string[]; usage: 'server' | 'client' | 'both' }): Promise<CertFiles>;
}

export async function createCa(dir: string, name: string): Promise<Ca> {
  await mkdir(dir, { recursive: true });
  const key = join(dir, `${name}.key`);
  const cert = join(dir, `${name}.crt`);
  await execFileP('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  const issue: Ca['issue'] = async (leaf, o) => {
    const lkey = join(dir, `${leaf}.key`);
    const lcsr = join(dir, `${leaf}.csr`);
    const lcert = join(dir, `${leaf}.crt`);
    const ext = join(dir, `${leaf}.ext`);
    const san = [...(o.ips ?? []).map((ip) => `IP:${ip}`), ...(o.dns ?? []).map((d) => `DNS:${d}`)];
    const eku = o.usage === 'server' ? 'serverAuth' : o.usage === 'client' ? 'clientAuth' : 'serverAuth,clientAuth';
    await writeFile(ext, [`extendedKeyUsage=${eku}`, 'keyUsage=critical,digitalSignature,keyEncipherment', ...(san.length ? [`subjectAltName=${san.join(',')}`] : [])].join('\n') + '\n');
    await execFileP('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', lkey, '-out', lcsr, '-subj', `/CN=${o.cn}`]);
    await execFileP('openssl', ['x509', '-req', '-in', lcsr, '-CA', cert, '-CAkey', key, '-CAcreateserial', '-days', '2', '-out', lcert, '-extfile', ext]);
    return { cert: lcert, key: lkey };
  };
  return { cert, key, issue };
}

export async function pem(files: CertFiles): Promise<{ cert: string; key: string }> {
  return { cert: await readFile(files.cert, 'utf8'), key: await readFile(files.key, 'utf8') };
}
