"""Bad input gets a precise 4xx in the project's error format, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

ERROR_KEYS = {"detail", "type", "code", "reason"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ERROR_KEYS
    assert body["code"] == status  # the HTTP status, an integer, as the original API documents
    assert body["reason"] == code
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize("path", ["/ask", "/v2/ask"])
@pytest.mark.parametrize(
    ("payload", "code", "detail_part"),
    [
        ({"question": ""}, "question_empty", "must not be empty"),
        ({"question": "   \n\t "}, "question_empty", "must not be empty"),
        ({"question": 42}, "question_not_string", "must be a string"),
        ({"question": None}, "question_not_string", "must be a string"),
        ({"question": ["what is aave"]}, "question_not_string", "must be a string"),
        ({"question": "x" * 1001}, "question_too_long", "limit is 1000"),
        ({}, "missing_field", "question is required"),
        ({"text": "what is aave"}, "missing_field", "question is required"),
    ],
)
def test_invalid_questions_get_precise_422(
    client: httpx.Client, path: str, payload: dict[str, object], code: str, detail_part: str
) -> None:
    body = assert_error(client.post(path, json=payload), 422, code)
    assert detail_part in body["detail"]


def test_question_at_the_limit_is_accepted(client: httpx.Client) -> None:
    response = client.post("/ask", json={"question": "what is aave? " + "a" * 986})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("content", "code"),
    [("{not json", "invalid_json"), ("[1, 2]", "invalid_body"), ('"just a string"', "invalid_body")],
)
def test_malformed_bodies(client: httpx.Client, content: str, code: str) -> None:
    response = client.post("/ask", content=content, headers={"content-type": "application/json"})
    assert_error(response, 422, code)


def test_oversized_body_is_413(client: httpx.Client) -> None:
    body = assert_error(client.post("/ask", json={"question": "a" * 20_000}), 413, "payload_too_large")
    assert "16384" in body["detail"]


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"question": "'
        for _ in range(40):
            yield b"a" * 1000
        yield b'"}'

    response = client.post("/ask", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large")


def test_unknown_route_is_404(client: httpx.Client) -> None:
    body = assert_error(client.get("/no/such/route"), 404, "not_found")
    assert body["type"] == "not_found"
    assert "/no/such/route" in body["detail"]


def test_wrong_method_is_405(client: httpx.Client) -> None:
    body = assert_error(client.put("/ask", json={"question": "hi"}), 405, "method_not_allowed")
    assert "PUT" in body["detail"]


def test_invalid_session_id_format_is_422(client: httpx.Client) -> None:
    response = client.post("/v2/ask", json={"question": "what is aave", "session_id": "../../etc/passwd"})
    body = assert_error(response, 422, "invalid_request")
    assert "session_id" in body["detail"]


def test_server_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    for content in ["{", "[]", "null", '{"question": {"nested": true}}', "\x00\x01"]:
        assert client.post("/ask", content=content, headers={"content-type": "application/json"}).status_code < 500
    response = client.post("/ask", json={"question": "What is a liquidity pool?"})
    assert response.status_code == 200
    assert response.json()["processing_stage"] == "response_complete"


def test_security_headers_and_request_id(client: httpx.Client) -> None:
    response = client.get("/health", headers={"X-Request-ID": "0123456789abcdef0123456789abcdef"})
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-request-id"] == "0123456789abcdef0123456789abcdef"
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32
