// Test-only OpenID Connect provider for the dicomcloud test suite.
//
// Wraps panva's certified `oidc-provider` (8.x, runs on Node.js >= 18 LTS) and
// issues JWT access tokens via the OAuth 2.0 client credentials grant. Started
// by tests/oidc_provider.py.
//
// Usage: node provider.mjs CONFIG_JSON_PATH
//
// Config JSON:
//   port              int, listens on 127.0.0.1 only
//   issuer            e.g. "http://127.0.0.1:PORT"
//   audience          string, becomes the JWT `aud` (resource server identifier)
//   keys              JWKS {"keys": [...]} of PRIVATE JWKs (kid + alg); keys[0] signs
//   clients           [{client_id, client_secret, scope, tenant?, token_endpoint_auth_method?}]
//   access_token_ttl  seconds, default 300
//
// Prints "READY <issuer>" on stdout once listening; exits 0 on SIGTERM/SIGINT.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import process from 'node:process';

import Provider, { errors } from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  process.stderr.write('usage: node provider.mjs CONFIG_JSON_PATH\n');
  process.exit(2);
}

const config = JSON.parse(readFileSync(configPath, 'utf8'));
const {
  port,
  issuer = `http://127.0.0.1:${config.port}`,
  audience,
  keys,
  clients = [],
  access_token_ttl: accessTokenTTL = 300,
} = config;

if (!Number.isInteger(port)) throw new Error('config.port must be an integer');
if (typeof audience !== 'string' || !audience) throw new Error('config.audience must be a non-empty string');
if (!keys?.keys?.length) throw new Error('config.keys must be a JWKS with at least one private key');

const signingKey = keys.keys[0];
if (!signingKey.alg || !signingKey.kid) throw new Error('every key needs "alg" and "kid"');

// RFC 8707 resource indicators must be absolute URIs. If the configured
// audience is one, it is also the resource indicator; otherwise a fixed URN
// stands in for it (the JWT `aud` is still exactly `audience`).
function isAbsoluteURI(value) {
  try {
    new URL(value); // eslint-disable-line no-new
    return !value.includes('#');
  } catch {
    return false;
  }
}
const audienceIsURI = isAbsoluteURI(audience);
const RESOURCE = audienceIsURI ? audience : 'urn:dicomcloud-test:resource-server';
const acceptedResources = new Set([RESOURCE, audience]);

const tenants = new Map();
const allScopes = new Set();
for (const c of clients) {
  if (c.tenant !== undefined && c.tenant !== null) tenants.set(c.client_id, c.tenant);
  for (const s of (c.scope || '').split(' ').filter(Boolean)) allScopes.add(s);
}

const provider = new Provider(issuer, {
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    scope: c.scope || '',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: c.token_endpoint_auth_method || 'client_secret_basic',
  })),
  jwks: keys,
  // Unused here (no browser flows), but oidc-provider 8.x warns on stderr without it.
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // Without this an EC-only key set fails client validation (the default
  // id_token_signed_response_alg is RS256, which then has no key).
  clientDefaults: { id_token_signed_response_alg: signingKey.alg },
  // Registering every client scope as a provider scope makes a request for a
  // scope outside the client's allow-list fail with invalid_scope (instead of
  // the scope being silently dropped).
  scopes: [...allScopes],
  ttl: { ClientCredentials: accessTokenTTL },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resourceIndicator, client) => {
        if (!acceptedResources.has(resourceIndicator)) {
          throw new errors.InvalidTarget(`unknown resource indicator ${resourceIndicator}`);
        }
        return {
          audience,
          scope: client?.scope || '',
          accessTokenFormat: 'jwt',
          accessTokenTTL,
          jwt: { sign: { alg: signingKey.alg, kid: signingKey.kid } },
        };
      },
    },
  },
  extraTokenClaims: (_ctx, token) => {
    if (tenants.has(token.clientId)) return { tenant: tenants.get(token.clientId) };
    return undefined;
  },
});

provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`server_error: ${err?.stack || err}\n`);
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`READY ${issuer}\n`);
});
server.on('error', (err) => {
  process.stderr.write(`listen error: ${err?.stack || err}\n`);
  process.exit(1);
});

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
