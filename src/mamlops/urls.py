"""URLs that may carry credentials (a data mirror, an MLflow server): shown without them,
sent with them as a header.

A mirror or tracking URL such as ``https://user:TOKEN@host/path/`` must work (urllib alone does
not understand userinfo: it takes ``user:TOKEN@host`` for a host name) and must never show its
token in a message, a CI log or MLflow. No effect on any output: data is verified by its
fingerprints, whatever fetched it.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request


def redact(url: str) -> str:
    """``url`` safe to print or log: its userinfo (user name, password, token) becomes ``***``.

    A mirror may carry credentials (``https://user:TOKEN@host/omniglot/``); every message and
    log line that names a URL goes through here, so the token never reaches a terminal, a CI
    log or MLflow.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]  # a lone user name can be a token too
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def request(url: str) -> urllib.request.Request:
    """A request for ``url`` with its userinfo moved into an ``Authorization: Basic`` header.

    urllib does not understand userinfo: it would take ``user:TOKEN@host`` for a host name (and
    print it in its errors), so credentials are parsed here and the URL sent without them.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    user, _, password = (urllib.parse.unquote(x) for x in userinfo.partition(":"))
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def join(base: str, name: str) -> str:
    """The URL of file ``name`` in the folder URL ``base``, keeping ``base``'s query.

    A signed mirror (``https://host/omniglot?token=...``) names its folder and carries its
    token in the query: ``urljoin`` would drop the last path segment and the query, and fetch
    ``https://host/images_background.zip``. Here the folder is the whole path, and the query
    goes with every file.
    """
    parts = urllib.parse.urlsplit(base)
    folder = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit(parts._replace(path=folder + urllib.parse.quote(name)))
