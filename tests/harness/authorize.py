#!/usr/bin/env python3
"""Run the OAuth 2.0 authorization-code flow (PKCE S256 + state) against the
harness's oidc-provider without a browser, and print the token response JSON.

The harness's /interaction/:uid route logs in as `login_hint` and grants every
requested scope, so following the redirects with a cookie jar is enough.

Usage:
  authorize.py --issuer URL --client-id ID --client-secret S --user EMAIL
               [--scope "openid offline_access mail"]
               [--redirect-uri http://127.0.0.1/oauth/callback]
  authorize.py --url AUTHORIZATION_URL [--user EMAIL]
The second form plays the browser for an authorization URL built by someone
else (e.g. printed by `mailgate authorize`): it adds login_hint=EMAIL if the
URL has none, follows the redirects, and prints on stdout the first redirect
target that starts with the URL's redirect_uri (it carries code, state and iss,
or error). That URL is neither requested nor redeemed. Exit status 0.
Exit status is non-zero (with a message on stderr) on any error, e.g. when the
authorization is refused (user deny@example.test gives access_denied; in --url
mode that is a normal redirect, printed with exit status 0).
Python 3 standard library only.
"""
import argparse
import base64
import hashlib
import html
import http.cookiejar
import json
import re
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
        body = e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return ""
    # oidc-provider's HTML error page: <pre><strong>error</strong>: ...</pre>
    fields = re.findall(r"<pre><strong>(\w+)</strong>: (.*?)</pre>", body)
    if fields:
        return "; ".join(f"{k}: {html.unescape(v)}" for k, v in fields)
    return body[:500]


def same_endpoint(url, redirect_uri):
    """True if url is the redirect_uri (query ignored; the port is ignored for
    loopback hosts, as oidc-provider does for native clients)."""
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(redirect_uri)
    if (a.scheme, a.hostname, a.path) != (b.scheme, b.hostname, b.path):
        return False
    return a.port == b.port or a.hostname in ("127.0.0.1", "::1", "localhost")


def follow(opener, url, is_target, timeout):
    """GET url and follow redirects by hand (the opener keeps cookies) until a
    redirect target satisfies is_target; return that target (not requested)."""
    for _ in range(MAX_REDIRECTS):
        if is_target(url):
            return url
        try:
            resp = opener.open(url, timeout=timeout)
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
    fail(f"no redirect to the redirect_uri after {MAX_REDIRECTS} hops")


def url_mode(args, opener):
    """--url: play the browser for a ready-made authorization URL."""
    url = args.url
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    redirect_uri = query.get("redirect_uri")
    if not redirect_uri:
        fail("--url has no redirect_uri parameter")
    if "login_hint" not in query:
        if not args.user:
            fail("--url has no login_hint; give --user EMAIL")
        url = url.split("#", 1)[0]
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"login_hint": args.user})
    ru = urllib.parse.urlsplit(redirect_uri)

    def is_target(u):
        if u.startswith(redirect_uri):
            return True
        a = urllib.parse.urlsplit(u)  # same URL up to normalisation (e.g. :80)
        return (a.scheme, a.hostname, a.port or 80, a.path) == (ru.scheme, ru.hostname, ru.port or 80, ru.path)

    final = follow(opener, url, is_target, args.timeout)
    error = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(final).query)).get("error")
    if error:
        print(f"authorize.py: note: the authorization response carries error={error}", file=sys.stderr)
    print(final)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="complete authorization URL: print the redirect to its redirect_uri")
    ap.add_argument("--issuer")
    ap.add_argument("--client-id")
    ap.add_argument("--client-secret")
    ap.add_argument("--user", help="login_hint, e.g. alice@example.test")
    ap.add_argument("--scope", default="openid offline_access mail")
    ap.add_argument("--redirect-uri", default="http://127.0.0.1/oauth/callback")
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args()

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect())
    if args.url:
        return url_mode(args, opener)
    missing = [f"--{a.replace('_', '-')}" for a in ("issuer", "client_id", "client_secret", "user")
               if not getattr(args, a)]
    if missing:
        ap.error(f"the following arguments are required without --url: {', '.join(missing)}")
    issuer = args.issuer.rstrip("/")

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
    url = follow(opener, url, lambda u: same_endpoint(u, args.redirect_uri), args.timeout)
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))

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
