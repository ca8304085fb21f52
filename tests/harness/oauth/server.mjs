// Test-only OAuth 2.0 / OIDC authorization server for the mailgate harness.
// It only *configures* the `oidc-provider` package; every OAuth endpoint
// (/auth, /token, /token/introspection, /token/revocation, /device/auth, ...)
// is implemented by the package. What we add uses its extension points:
// - /interaction/:uid, which the package requires the application to provide:
//   it auto-completes login + consent without a browser (the account is the
//   `login_hint`);
// - Client#redirectUriAllowed widened for loopback URIs (as in the package's
//   recipes/redirect_uri_wildcards.md);
// - the JWT bearer grant (RFC 7523, Google service accounts) through
//   provider.registerGrantType().
//
// Usage: node server.mjs PORT [DIR]   (or PORT=... node server.mjs). Listens on 127.0.0.1.
// DIR (given by `start`) holds client-jwt.pem (certificate of the
// private_key_jwt client mailgate-jwt) and service-account.json (the service
// account of the JWT bearer grant); without DIR neither exists.
import { createHash, createPublicKey, generateKeyPairSync, verify, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] || process.env.PORT);
if (!port) { console.error('usage: node server.mjs PORT [DIR]'); process.exit(2); }
const issuer = `http://127.0.0.1:${port}`;
const dir = process.argv[3];
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';

// Ephemeral signing key for ID tokens (access tokens are opaque).
const jwk = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

// Clients that may use the token endpoint. application_type "native" makes
// oidc-provider accept a loopback redirect URI on any port; the override of
// redirectUriAllowed below also accepts any path. Native clients stay
// confidential: the token endpoint still requires their registered auth method.
const userClient = (client_id, auth) => ({
  client_id, ...auth,
  application_type: 'native',
  grant_types: ['authorization_code', 'refresh_token', 'client_credentials',
    'urn:ietf:params:oauth:grant-type:device_code'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/oauth/callback', 'http://[::1]/oauth/callback'],
  mailbox: 'app@example.test', // who a client_credentials token logs in as
});
const secretClient = (id) => userClient(id, { client_secret: `${id}-secret`, token_endpoint_auth_method: 'client_secret_basic' });

// mailgate-jwt authenticates with private_key_jwt (RFC 7523 client assertion,
// RS256) signed by DIR/client-jwt.key; we register its certificate's public key.
function certJwk(file) {
  const cert = new X509Certificate(readFileSync(file));
  const x5tS256 = createHash('sha256').update(cert.raw).digest('base64url');
  return { ...cert.publicKey.export({ format: 'jwk' }), alg: 'RS256', use: 'sig', kid: x5tS256,
    x5c: [cert.raw.toString('base64')], 'x5t#S256': x5tS256 };
}

// The Google-style service account (DIR/service-account.json) of the JWT bearer grant.
const sa = dir && JSON.parse(readFileSync(`${dir}/service-account.json`, 'utf8'));
const saKey = sa && createPublicKey(sa.private_key);

const clients = [
  secretClient('mailgate-test'),
  secretClient('mailgate-short'), // 5 s access tokens
  ...(dir ? [
    userClient('mailgate-jwt', { token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'RS256', jwks: { keys: [certJwk(`${dir}/client-jwt.pem`)] } }),
    // Public client that JWT bearer requests are attributed to (they carry no
    // client authentication; see the body shim below).
    { client_id: 'svc-account', token_endpoint_auth_method: 'none', grant_types: [JWT_BEARER],
      response_types: [], redirect_uris: [] },
  ] : []),
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

// Any native client (mailgate-test, mailgate-short, mailgate-jwt) accepts
// http://127.0.0.1, localhost or [::1] with any port AND any path (the
// gateway's callback is /oauth2/callback/<name>-<hash> on a port chosen at run
// time). oidc-provider's RFC 8252 rule only ignores the port; we widen the
// documented Client#redirectUriAllowed hook, as recipes/redirect_uri_wildcards.md.
const { redirectUriAllowed } = provider.Client.prototype;
provider.Client.prototype.redirectUriAllowed = function loopbackAnyPortAnyPath(uri) {
  const u = URL.parse(uri);
  return redirectUriAllowed.call(this, uri) || (this.applicationType === 'native' && u?.protocol === 'http:'
    && ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname) && !u.username && !u.password && !u.hash);
};

// JWT bearer grant (RFC 7523 section 2.1) as Google service accounts use it:
// POST /token grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT,
// the JWT signed (RS256) with the service account's private key, with claims
// iss = client_email, sub = the user to act as, scope, aud = token endpoint,
// iat, exp (at most 1 h later). The answer is an opaque 1-hour access token for
// account `sub` (so its email claim is sub), without refresh token.
if (sa) {
  const refuse = (why) => { throw new errors.CustomOIDCProviderError('invalid_grant', why); };
  provider.registerGrantType(JWT_BEARER, async (ctx) => {
    if (!ctx.oidc.params.assertion) throw new errors.InvalidRequest("missing required parameter 'assertion'");
    const [h, p, sig, extra] = ctx.oidc.params.assertion.split('.');
    if (!sig || extra !== undefined) refuse('assertion is not a JWS compact serialization');
    let header, claims;
    try {
      header = JSON.parse(Buffer.from(h, 'base64url')) ?? {};
      claims = JSON.parse(Buffer.from(p, 'base64url')) ?? {};
    } catch { refuse('assertion header or payload is not base64url JSON'); }
    if (header.alg !== 'RS256') refuse('assertion alg must be RS256');
    if (header.kid !== undefined && header.kid !== sa.private_key_id) refuse('assertion kid is not the private_key_id');
    if (!verify('sha256', Buffer.from(`${h}.${p}`), saKey, Buffer.from(sig, 'base64url'))) refuse('invalid assertion signature');
    const now = Math.floor(Date.now() / 1000);
    if (claims.iss !== sa.client_email) refuse('iss must be the service account client_email');
    if (claims.aud !== ctx.oidc.urlFor('token')) refuse('aud must be the token endpoint URL');
    if (!Number.isInteger(claims.iat) || !Number.isInteger(claims.exp)) refuse('iat and exp must be integers');
    if (claims.exp <= now) refuse('assertion expired');
    if (claims.iat > now + 60 || claims.exp - claims.iat > 3600) refuse('iat in the future or exp - iat over 3600 s');
    if (typeof claims.scope !== 'string' || !claims.scope) refuse('scope claim missing');
    if (typeof claims.sub !== 'string' || !claims.sub) refuse('sub claim (user to act as) missing');
    const token = new provider.AccessToken({ accountId: claims.sub, client: ctx.oidc.client, scope: claims.scope });
    ctx.oidc.entity('AccessToken', token);
    ctx.body = { access_token: await token.save(), expires_in: token.expiration, token_type: 'Bearer' };
  }, 'assertion');

  // Like Google's, these token requests carry no client authentication, but
  // oidc-provider needs a client_id even for the "none" method; so a POST
  // /token without Authorization header whose form has this grant type and no
  // client_id gets client_id=svc-account appended. We read the body and hand
  // it on as req.body, which oidc-provider accepts from upstream body parsers
  // (it logs one "already parsed request body" warning).
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && ctx.path === '/token' && !ctx.get('authorization')
        && ctx.is('application/x-www-form-urlencoded')) {
      const chunks = [];
      for await (const chunk of ctx.req) chunks.push(chunk);
      let body = Buffer.concat(chunks).toString();
      const form = new URLSearchParams(body);
      if (form.get('grant_type') === JWT_BEARER && !form.has('client_id')) body += '&client_id=svc-account';
      ctx.req.body = body;
    }
    return next();
  });
}

// The interaction route: login = login_hint, consent = grant everything asked.
// `?login_hint=EMAIL` on the interaction URL stands in for the login form
// (device.py uses it: device authorization requests need not carry a hint);
// it wins over the authorization request's login_hint.
provider.use(async (ctx, next) => {
  const m = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (!m) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== m[1]) ctx.throw(400, 'interaction uid mismatch');
  const { prompt, params, session } = details;
  const hint = ctx.query.login_hint || params.login_hint;
  let result;
  if (hint === 'deny@example.test') {
    result = { error: 'access_denied', error_description: 'refused by the test harness (deny@example.test)' };
  } else if (prompt.name === 'login') {
    result = hint
      ? { login: { accountId: String(hint) } }
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
