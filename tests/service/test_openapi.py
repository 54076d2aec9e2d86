"""The OpenAPI document is complete: every v1 operation has a summary, auth, error bodies and a
typed success response, so generated clients need no hand-written glue."""

from __future__ import annotations

OURS = {"datasets", "runs", "results", "health", "keys", "open inference protocol (v2)"}  # serving: own files


def test_every_operation_is_documented(stack):
    from app.main import app  # after `stack` has pointed the settings at the test stack

    spec = app.openapi()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if not OURS & set(op.get("tags", [])):
                continue
            assert op.get("summary"), (method, path)
            ok = [code for code in op["responses"] if code.startswith("2")]
            assert ok, (method, path)
            if path.startswith("/v1/") or path.startswith("/v2/models/"):
                assert op.get("security"), (method, path)
                assert "401" in op["responses"] and "404" in op["responses"], (method, path)
                detail = op["responses"]["404"]["content"]["application/json"]["schema"]
                assert detail == {"$ref": "#/components/schemas/ErrorBody"}
            checked += 1
    assert checked >= 16
    upload = spec["paths"]["/v1/datasets"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert "413" in upload["responses"]
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])


def test_api_manual_loads_without_internet(anon_client):
    """/docs and /redoc reference only assets the app serves itself (a machine offline still gets them)."""
    import re

    for page in ("/docs", "/redoc"):
        r = anon_client.get(page)
        assert r.status_code == 200, page
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
        assert urls, page
        for url in urls:
            assert not url.startswith(("http:", "https:", "//")), (page, url)
            asset = anon_client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, (page, url)
    assert "SwaggerUIBundle" in anon_client.get("/docs-assets/swagger-ui-bundle.js").text
    assert anon_client.get("/docs/oauth2-redirect").status_code == 200
