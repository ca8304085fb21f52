// Test-only OAuth 2.0 / OIDC authorization server for the mailgate harness.
// It only *configures* the `oidc-provider` package; every OAuth endpoint
// (/auth, /token, /token/introspection, /token/revocation, /device/auth, ...)
// is implemented by the package. The one route we add is /interaction/:uid,
// which the package requires the application to provide: it auto-completes
// login + consent without a browser (the account is the `login_hint`).
//
// Usage: node server.mjs PORT   (or PORT=... node server.mjs). Listens on 127.0.0.1.
import { generateKeyPairSync } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] || process.env.PORT);
if (!port) { console.error('usage: node server.mjs PORT'); process.exit(2); }
const issuer = `http://127.0.0.1:${port}`;

// Ephemeral signing key for ID tokens (access tokens are opaque).
const jwk = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

// Clients that may use the token endpoint. application_type "native" makes
// oidc-provider accept a loopback redirect URI on any port.
const userClient = (client_id, client_secret) => ({
  client_id, client_secret,
  application_type: 'native',
  token_endpoint_auth_method: 'client_secret_basic',
  grant_types: ['authorization_code', 'refresh_token', 'client_credentials',
    'urn:ietf:params:oauth:grant-type:device_code'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/oauth/callback', 'http://[::1]/oauth/callback'],
  mailbox: 'app@example.test', // who a client_credentials token logs in as
});
const clients = [
  userClient('mailgate-test', 'mailgate-test-secret'),
  userClient('mailgate-short', 'mailgate-short-secret'), // 5 s access tokens
  // Dovecot's credentials for the introspection endpoint; it gets no tokens.
  { client_id: 'dovecot', client_secret: 'dovecot-secret', grant_types: [], response_types: [],
    redirect_uris: [], token_endpoint_auth_method: 'client_secret_basic' },
];

const tokenTTL = (_ctx, _token, client) => (client?.clientId === 'mailgate-short' ? 5 : 3600);

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [jwk] },
  cookies: { keys: ['mailgate-harness-not-secret'] },
  extraClientMetadata: { properties: ['mailbox'] },
  scopes: ['openid', 'offline_access', 'email', 'mail'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  // Accounts exist for any id; the id is the e-mail address (the login_hint).
  findAccount: (_ctx, id) => ({
    accountId: id,
    claims: () => ({ sub: id, email: id, email_verified: true }),
  }),
  features: {
    devInteractions: { enabled: false }, // we provide /interaction/:uid below
    // Any authenticated client (i.e. dovecot) may introspect any token; a
    // client may revoke only its own tokens (as oidc-provider's default).
    introspection: { enabled: true, allowedPolicy: () => true },
    revocation: {
      enabled: true,
      allowedPolicy: (_ctx, client, token) => {
        if (token.clientId !== client.clientId) throw new errors.InvalidRequest('not your token');
        return true;
      },
    },
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
  },
  pkce: { required: () => true }, // S256 (the only method oidc-provider 9 supports)
  // Every token with a refresh_token-capable client gets a refresh token, even
  // without offline_access/prompt=consent, and it always rotates on use.
  issueRefreshToken: (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,
  // Tokens are not tied to the (cookie) browser session of the authorize step.
  expiresWithSession: () => false,
  // Every access token carries `email`; introspection returns it at top level,
  // and Dovecot uses it as the user name (username_attribute = email).
  extraTokenClaims: async (_ctx, token) => {
    if (token.kind === 'ClientCredentials') {
      const client = await provider.Client.find(token.clientId);
      return { email: client?.mailbox };
    }
    return token.accountId ? { email: token.accountId } : undefined;
  },
  ttl: {
    AccessToken: tokenTTL,
    ClientCredentials: tokenTTL,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 3600,
    Interaction: 3600,
    RefreshToken: 14 * 86400,
    Grant: 14 * 86400,
    Session: 14 * 86400,
  },
});

// Minimal request log on stderr: method, path (no query: it may hold codes), status.
provider.use(async (ctx, next) => {
  try { await next(); } finally { console.error(`${ctx.method} ${ctx.path} ${ctx.status}`); }
});

// The interaction route: login = login_hint, consent = grant everything asked.
provider.use(async (ctx, next) => {
  const m = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (!m) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== m[1]) ctx.throw(400, 'interaction uid mismatch');
  const { prompt, params, session } = details;
  let result;
  if (params.login_hint === 'deny@example.test') {
    result = { error: 'access_denied', error_description: 'refused by the test harness (deny@example.test)' };
  } else if (prompt.name === 'login') {
    result = params.login_hint
      ? { login: { accountId: String(params.login_hint) } }
      : { error: 'login_required', error_description: 'test harness needs login_hint=EMAIL' };
  } else if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(d.missingResourceScopes || {})) {
      grant.addResourceScope(resource, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  } else {
    ctx.throw(400, `unsupported prompt ${prompt.name}`);
  }
  const url = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
  ctx.status = 303;
  ctx.redirect(url);
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ready at ${issuer}`);
});
