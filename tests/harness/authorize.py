#!/usr/bin/env python3
"""Run the OAuth 2.0 authorization-code flow (PKCE S256 + state) against the
harness's oidc-provider without a browser, and print the token response JSON.

The harness's /interaction/:uid route logs in as `login_hint` and grants every
requested scope, so following the redirects with a cookie jar is enough.

Usage:
  authorize.py --issuer URL --client-id ID --client-secret S --user EMAIL
               [--scope "openid offline_access mail"]
               [--redirect-uri http://127.0.0.1/oauth/callback]
Exit status is non-zero (with a message on stderr) on any error, e.g. when the
authorization is refused (user deny@example.test gives access_denied).
Python 3 standard library only.
"""
import argparse
import base64
import hashlib
import http.cookiejar
import json
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request

MAX_REDIRECTS = 20


def fail(msg):
    print(f"authorize.py: {msg}", file=sys.stderr)
    sys.exit(1)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand 3xx responses back to us instead of following them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def http_error_body(e):
    try:
        return e.read().decode("utf-8", "replace")[:500]
    except Exception:  # noqa: BLE001
        return ""


def same_endpoint(url, redirect_uri):
    """True if url is the redirect_uri (query ignored; the port is ignored for
    loopback hosts, as oidc-provider does for native clients)."""
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(redirect_uri)
    if (a.scheme, a.hostname, a.path) != (b.scheme, b.hostname, b.path):
        return False
    return a.port == b.port or a.hostname in ("127.0.0.1", "::1", "localhost")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret", required=True)
    ap.add_argument("--user", required=True, help="login_hint, e.g. alice@example.test")
    ap.add_argument("--scope", default="openid offline_access mail")
    ap.add_argument("--redirect-uri", default="http://127.0.0.1/oauth/callback")
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args()

    issuer = args.issuer.rstrip("/")
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect())

    # Discovery.
    try:
        with opener.open(f"{issuer}/.well-known/openid-configuration", timeout=args.timeout) as r:
            meta = json.load(r)
    except (urllib.error.URLError, ValueError) as e:
        fail(f"discovery at {issuer} failed: {e}")
    if meta.get("issuer") != issuer:
        fail(f"discovery issuer mismatch: {meta.get('issuer')!r} != {issuer!r}")

    # Authorization request with PKCE S256 and state.
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    query = urllib.parse.urlencode({
        "response_type": "code",
        "client_id": args.client_id,
        "redirect_uri": args.redirect_uri,
        "scope": args.scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": args.user,
    })
    url = f"{meta['authorization_endpoint']}?{query}"

    # Follow redirects by hand (keeping cookies) until we reach redirect_uri.
    params = None
    for _ in range(MAX_REDIRECTS):
        if same_endpoint(url, args.redirect_uri):
            params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
            break
        try:
            resp = opener.open(url, timeout=args.timeout)
            status, headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, None
            if status not in (301, 302, 303, 307, 308):
                fail(f"GET {urllib.parse.urlsplit(url).path} -> HTTP {status}: {http_error_body(e)}")
        except urllib.error.URLError as e:
            fail(f"GET {url} failed: {e}")
        location = headers.get("Location")
        if status not in (301, 302, 303, 307, 308) or not location:
            snippet = (body or b"").decode("utf-8", "replace")[:500]
            fail(f"expected a redirect from {urllib.parse.urlsplit(url).path}, got HTTP {status}: {snippet}")
        url = urllib.parse.urljoin(url, location)
    if params is None:
        fail(f"no redirect to {args.redirect_uri} after {MAX_REDIRECTS} hops")

    if params.get("state") != state:
        fail("state mismatch in the authorization response")
    if "iss" in params and params["iss"] != issuer:
        fail(f"iss mismatch in the authorization response: {params['iss']!r}")
    if "error" in params:
        fail(f"authorization refused: {params['error']}: {params.get('error_description', '')}")
    if "code" not in params:
        fail(f"authorization response without code: {sorted(params)}")

    # Token request, client_secret_basic (RFC 6749 2.3.1: form-encode id and secret).
    basic = base64.b64encode(
        f"{urllib.parse.quote_plus(args.client_id)}:{urllib.parse.quote_plus(args.client_secret)}".encode()
    ).decode()
    data = urllib.parse.urlencode({
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": args.redirect_uri,
        "code_verifier": verifier,
    }).encode()
    req = urllib.request.Request(meta["token_endpoint"], data=data, method="POST", headers={
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    })
    try:
        with opener.open(req, timeout=args.timeout) as r:
            tokens = json.load(r)
    except urllib.error.HTTPError as e:
        fail(f"token endpoint -> HTTP {e.code}: {http_error_body(e)}")
    except (urllib.error.URLError, ValueError) as e:
        fail(f"token request failed: {e}")
    if "access_token" not in tokens:
        fail(f"token response without access_token: {sorted(tokens)}")
    json.dump(tokens, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
