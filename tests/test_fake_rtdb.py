"""Check tests/fake_rtdb.py against the documented Realtime Database REST semantics.

Driven over real HTTP with ``httpx2`` (the client the CLI uses).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx2
import pytest
from fake_rtdb import (
    NULL_ETAG,
    FakeRealtimeDatabase,
    RecordedRequest,
    push_id,
)

ETAG_ON = {"X-Firebase-ETag": "true"}
KEY_ERROR_TAIL = "Key value can't be empty or contain $ # [ ] / or ."


@pytest.fixture
def db() -> Iterator[FakeRealtimeDatabase]:
    with FakeRealtimeDatabase() as server:
        yield server


@pytest.fixture
def client(db: FakeRealtimeDatabase) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=db.url, timeout=5.0) as c:
        yield c


def error_of(response: httpx2.Response) -> str:
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}
    return body["error"]


# -- lifecycle --------------------------------------------------------------


def test_url_is_loopback_and_unavailable_before_start() -> None:
    fake = FakeRealtimeDatabase()
    with pytest.raises(RuntimeError):
        _ = fake.url
    with fake:
        assert fake.url.startswith("http://127.0.0.1:")
        assert httpx2.get(f"{fake.url}/.json").status_code == 200
    fake.start()
    try:
        assert httpx2.get(f"{fake.url}/.json").json() is None
    finally:
        fake.stop()


# -- reads, writes, null --------------------------------------------------


def test_get_of_empty_database_and_missing_path_is_200_null(client: httpx2.Client) -> None:
    for path in ("/.json", "/nothing/here.json"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.json() is None
        assert r.headers["content-type"].startswith("application/json")


def test_put_replaces_value_and_echoes_it(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("users/jack", {"first": "Jack", "last": "Sparrow", "age": 40})
    r = client.put("/users/jack.json", json={"first": "Jack", "ok": True})
    assert r.status_code == 200
    assert r.json() == {"first": "Jack", "ok": True}
    assert client.get("/users/jack.json").json() == {"first": "Jack", "ok": True}
    assert db.data == {"users": {"jack": {"first": "Jack", "ok": True}}}


def test_put_echo_is_the_stored_rendering_without_nulls(client: httpx2.Client) -> None:
    r = client.put("/x.json", json={"a": None, "b": 1, "c": {}})
    assert r.json() == {"b": 1}


def test_put_of_primitives_round_trips(client: httpx2.Client) -> None:
    for value in ("text", 12, 1.5, True, False, 0):
        assert client.put("/v.json", json=value).json() == value
        assert client.get("/v.json").json() == value


def test_writing_null_deletes_and_empty_parents_disappear(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("a/b/c", 1)
    db.set("keep", 2)
    r = client.put("/a/b/c.json", content=b"null")
    assert r.status_code == 200 and r.json() is None
    assert db.data == {"keep": 2}
    assert client.get("/a.json").json() is None


def test_nested_null_and_empty_objects_are_not_stored(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    client.put("/n.json", json={"x": None, "y": {"z": None}, "e": [], "o": {}})
    assert db.data is None
    assert client.get("/n.json").json() is None


def test_delete_returns_null_and_removes_subtree(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("a", {"b": 1, "c": {"d": 2}})
    r = client.delete("/a/c.json")
    assert r.status_code == 200 and r.json() is None
    assert db.data == {"a": {"b": 1}}


def test_writing_below_a_leaf_replaces_the_leaf(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("a", "leaf")
    client.put("/a/b.json", json=1)
    assert db.data == {"a": {"b": 1}}


def test_url_segments_are_percent_decoded(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    client.put("/r%C3%A9sum%C3%A9/a%20b.json", json=1)
    assert db.data == {"résumé": {"a b": 1}}
    assert client.get("/résumé/a b.json").json() == 1


def test_shallow_get_maps_children_to_true(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("s", {"a": {"deep": 1}, "b": "x"})
    assert client.get("/s.json", params={"shallow": "true"}).json() == {"a": True, "b": True}
    assert client.get("/s/b.json", params={"shallow": "true"}).json() == "x"


def test_print_pretty_is_the_same_json(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("p", {"a": [1, 2]})
    r = client.get("/p.json", params={"print": "pretty"})
    assert r.json() == {"a": [1, 2]}
    assert "\n" in r.text


@pytest.mark.parametrize(
    ("method", "body"),
    [("PUT", b'{"a":1}'), ("PATCH", b'{"a":1}'), ("POST", b'{"a":1}'), ("DELETE", b""), ("GET", b"")],
)
def test_print_silent_answers_204_without_body_and_still_writes(
    client: httpx2.Client, db: FakeRealtimeDatabase, method: str, body: bytes
) -> None:
    db.set("s/old", 1)
    r = client.request(method, "/s.json", params={"print": "silent"}, content=body)
    assert r.status_code == 204
    assert r.content == b""
    if method == "PUT":
        assert db.data == {"s": {"a": 1}}
    elif method == "PATCH":
        assert db.data == {"s": {"old": 1, "a": 1}}
    elif method == "DELETE":
        assert db.data is None


def test_invalid_json_body_is_400(client: httpx2.Client) -> None:
    for raw in (b"{not json", b"", b"NaN", b"\xff"):
        r = client.put("/x.json", content=raw)
        assert r.status_code == 400
        assert "couldn't parse JSON" in error_of(r)


def test_url_without_json_suffix_is_not_the_rest_api(client: httpx2.Client) -> None:
    assert client.get("/a").status_code == 404


def test_server_timestamp_is_resolved(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    client.put("/t.json", json={"at": {".sv": "timestamp"}})
    at = db.data["t"]["at"]
    assert isinstance(at, int) and at > 1_600_000_000_000


def test_method_override_header_turns_post_into_patch(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("m", {"a": 1})
    r = client.post("/m.json", json={"b": 2}, headers={"X-HTTP-Method-Override": "PATCH"})
    assert r.status_code == 200
    assert db.data == {"m": {"a": 1, "b": 2}}


# -- arrays ------------------------------------------------------------------


def test_dense_array_is_stored_as_indexed_object_and_read_as_array(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    assert client.put("/l.json", json=["a", "b", "c"]).json() == ["a", "b", "c"]
    assert db.data == {"l": {"0": "a", "1": "b", "2": "c"}}
    assert client.get("/l.json").json() == ["a", "b", "c"]
    assert client.get("/l/1.json").json() == "b"


def test_null_array_elements_are_not_stored(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    client.put("/l.json", json=["a", None, "c"])
    assert db.data == {"l": {"0": "a", "2": "c"}}
    assert client.get("/l.json").json() == ["a", None, "c"]


def test_sparse_keys_with_more_than_half_present_render_as_array_with_null_holes(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("l", {"0": "a", "1": "b", "3": "d"})  # 3 of 4 slots
    assert client.get("/l.json").json() == ["a", "b", None, "d"]
    db.set("m", {"1": "b", "2": "c"})  # index 0 missing, 2 of 3 slots
    assert client.get("/m.json").json() == [None, "b", "c"]


def test_too_sparse_integer_keys_render_as_object(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    # the blog's example: ['a','b','c','d','e'] with a, b and d deleted
    client.put("/l.json", json=["a", "b", "c", "d", "e"])
    for i in (0, 1, 3):
        client.delete(f"/l/{i}.json")
    assert client.get("/l.json").json() == {"2": "c", "4": "e"}
    db.set("only", {"5": "x"})
    assert client.get("/only.json").json() == {"5": "x"}


def test_array_boundary_is_max_key_below_twice_the_count(db: FakeRealtimeDatabase) -> None:
    db.set("a", {"0": 1, "3": 4})  # max 3 < 2*2: array
    assert db.get_rendered("a") == [1, None, None, 4]
    db.set("b", {"0": 1, "4": 5})  # max 4 == 2*2: object
    assert db.get_rendered("b") == {"0": 1, "4": 5}


def test_non_canonical_integer_keys_render_as_object(db: FakeRealtimeDatabase) -> None:
    db.set("z", {"0": "a", "01": "b"})
    assert db.get_rendered("z") == {"0": "a", "01": "b"}
    db.set("n", {"0": "a", "-1": "b"})
    assert db.get_rendered("n") == {"0": "a", "-1": "b"}
    db.set("mixed", {"0": "a", "x": "b"})
    assert db.get_rendered("mixed") == {"0": "a", "x": "b"}


def test_nested_arrays_render_at_every_level(client: httpx2.Client) -> None:
    value = {"rows": [[1, 2], {"k": ["x"]}]}
    client.put("/n.json", json=value)
    assert client.get("/n.json").json() == value


# -- POST / PATCH --------------------------------------------------------------


def test_post_creates_child_with_push_id(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    names = [client.post("/msgs.json", json={"i": i}).json()["name"] for i in range(5)]
    assert all(len(n) == 20 for n in names)
    assert names == sorted(names)  # chronologically sortable
    stored = db.data["msgs"]
    assert [stored[n]["i"] for n in names] == [0, 1, 2, 3, 4]


def test_push_ids_sort_by_time_even_within_one_millisecond() -> None:
    same_ms = [push_id(now_ms=1_700_000_000_000) for _ in range(50)]
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 50
    assert push_id(now_ms=1_800_000_000_000) > same_ms[-1]


def test_patch_updates_named_children_and_keeps_others(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("users/jack", {"first": "Jack", "last": "Sparrow"})
    r = client.patch("/users/jack.json", json={"last": "Jones"})
    assert r.status_code == 200 and r.json() == {"last": "Jones"}
    assert db.data == {"users": {"jack": {"first": "Jack", "last": "Jones"}}}


def test_patch_multi_path_keys_write_deep_locations_and_null_deletes(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("", {"a": {"keep": 1, "gone": 2}, "b": {"c": {"old": 1}}})
    body = {"a/gone": None, "b/c/new": "n", "/d/e/": True}
    r = client.patch("/.json", json=body)
    assert r.status_code == 200 and r.json() == body
    assert db.data == {"a": {"keep": 1}, "b": {"c": {"old": 1, "new": "n"}}, "d": {"e": True}}


def test_patch_body_must_be_an_object(client: httpx2.Client) -> None:
    for body in ([1, 2], "x", 3):
        r = client.patch("/a.json", json=body)
        assert r.status_code == 400


def test_patch_with_overlapping_paths_is_400(client: httpx2.Client) -> None:
    r = client.patch("/.json", json={"a": {"b": 1}, "a/b": 2})
    assert r.status_code == 400
    assert "ancestor" in error_of(r)


# -- ETags and conditional requests ---------------------------------------


def test_get_with_etag_header_returns_etag_and_plain_get_does_not(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("v", 10)
    r = client.get("/v.json", headers=ETAG_ON)
    assert r.json() == 10
    etag = r.headers["etag"]
    assert etag == db.etag("v") and len(etag) == 28  # base64 of a 20-byte SHA-1
    assert "etag" not in client.get("/v.json").headers


def test_etag_is_deterministic_and_changes_with_the_data(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("v", {"a": 1, "b": 2})
    first = client.get("/v.json", headers=ETAG_ON).headers["etag"]
    db.set("v", {"b": 2, "a": 1})
    assert client.get("/v.json", headers=ETAG_ON).headers["etag"] == first
    db.set("v/a", 3)
    assert client.get("/v.json", headers=ETAG_ON).headers["etag"] != first


def test_empty_location_etag_is_null_etag(client: httpx2.Client) -> None:
    r = client.get("/missing.json", headers=ETAG_ON)
    assert r.json() is None
    assert r.headers["etag"] == NULL_ETAG == "null_etag"


def test_conditional_put_with_current_etag_writes_and_returns_new_etag(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("counter", 10)
    etag = client.get("/counter.json", headers=ETAG_ON).headers["etag"]
    r = client.put("/counter.json", json=11, headers={"if-match": etag})
    assert r.status_code == 200 and r.json() == 11
    assert r.headers["etag"] == db.etag("counter") != etag
    assert db.data == {"counter": 11}


def test_conditional_put_with_stale_etag_is_412_with_current_value_and_etag(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("rec", {"status": "draft", "tags": ["a", "b"]})
    stale = client.get("/rec.json", headers=ETAG_ON).headers["etag"]
    db.set("rec/status", "approved")  # someone else wrote in between
    r = client.put("/rec.json", json={"status": "mine"}, headers={"if-match": stale})
    assert r.status_code == 412
    assert r.json() == {"status": "approved", "tags": ["a", "b"]}
    assert r.headers["etag"] == db.etag("rec")
    assert db.get_rendered("rec") == {"status": "approved", "tags": ["a", "b"]}
    # retry with the ETag from the 412 succeeds
    retry = client.put("/rec.json", json={"status": "mine"}, headers={"if-match": r.headers["etag"]})
    assert retry.status_code == 200


def test_if_match_null_etag_writes_only_when_location_is_empty(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    r = client.put("/lock.json", json="me", headers={"if-match": NULL_ETAG})
    assert r.status_code == 200
    again = client.put("/lock.json", json="other", headers={"if-match": NULL_ETAG})
    assert again.status_code == 412
    assert again.json() == "me"
    assert db.data == {"lock": "me"}


def test_conditional_delete_matching_and_stale(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.set("d", 1)
    stale = db.etag("d")
    db.set("d", 2)
    r = client.delete("/d.json", headers={"if-match": stale})
    assert r.status_code == 412 and r.json() == 2
    r = client.delete("/d.json", headers={"if-match": db.etag("d")})
    assert r.status_code == 200 and r.json() is None
    assert r.headers["etag"] == NULL_ETAG
    assert db.data is None


@pytest.mark.parametrize("method", ["PATCH", "POST"])
def test_if_match_on_patch_or_post_is_400(client: httpx2.Client, db: FakeRealtimeDatabase, method: str) -> None:
    db.set("a", {"x": 1})
    r = client.request(method, "/a.json", json={"y": 2}, headers={"if-match": db.etag("a")})
    assert r.status_code == 400
    assert "if-match" in error_of(r)
    assert db.data == {"a": {"x": 1}}


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_if_match_combined_with_print_silent_is_400(
    client: httpx2.Client, db: FakeRealtimeDatabase, method: str
) -> None:
    db.set("a", 1)
    r = client.request(
        method,
        "/a.json",
        params={"print": "silent"},
        content=b"2",
        headers={"if-match": db.etag("a")},
    )
    assert r.status_code == 400
    assert db.data == {"a": 1}


def test_concurrent_conditional_puts_with_the_same_etag_let_exactly_one_win(
    db: FakeRealtimeDatabase,
) -> None:
    db.set("slot", "free")
    etag = db.etag("slot")
    statuses: list[int] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        with httpx2.Client(base_url=db.url, timeout=5.0) as c:
            r = c.put("/slot.json", json=f"taken-{i}", headers={"if-match": etag})
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [412] * 11
    assert str(db.data["slot"]).startswith("taken-")


# -- key and path validation ----------------------------------------------


@pytest.mark.parametrize("bad", ["a.b", "a$b", "a#b", "a[b", "a]b", "a/b", "", "a\x01b", "a\x7fb"])
def test_invalid_key_in_put_body_is_400_with_position(
    client: httpx2.Client, db: FakeRealtimeDatabase, bad: str
) -> None:
    raw = '{"ok": {"fine": 1, ' + json.dumps(bad) + ": 2}}"
    r = client.put("/x.json", content=raw.encode())
    assert r.status_code == 400
    assert error_of(r) == f"Invalid data; couldn't parse key beginning at 1:20. {KEY_ERROR_TAIL}"
    assert db.data is None


def test_invalid_key_error_reports_line_and_column(client: httpx2.Client) -> None:
    raw = '{\n  "good": 1,\n  "bad.key": 2\n}'
    r = client.post("/x.json", content=raw.encode())
    assert r.status_code == 400
    assert "beginning at 3:3." in error_of(r)


def test_invalid_key_inside_array_element_is_400(client: httpx2.Client) -> None:
    r = client.put("/x.json", json=[{"a": 1}, {"b#": 2}])
    assert r.status_code == 400
    assert KEY_ERROR_TAIL in error_of(r)


def test_key_longer_than_768_bytes_is_400(client: httpx2.Client) -> None:
    assert client.put("/x.json", json={"k" * 768: 1}).status_code == 200
    assert client.put("/x.json", json={"é" * 385: 1}).status_code == 400  # 770 bytes


@pytest.mark.parametrize("path", ["/a.b.json", "/a$b.json", "/a%23b.json", "/a[b.json", "/a%01b.json"])
def test_invalid_url_path_is_400(client: httpx2.Client, path: str) -> None:
    r = client.put(path, json=1)
    assert r.status_code == 400
    assert error_of(r) == "Invalid path: Invalid token in path"


def test_patch_allows_slash_in_keys_but_validates_segments(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    assert client.patch("/.json", json={"a/b": 1}).status_code == 200
    for bad in ("a/b.c", "a//b", "", "/"):
        r = client.patch("/.json", json={bad: 1})
        assert r.status_code == 400, bad
        assert KEY_ERROR_TAIL in error_of(r)
    r = client.patch("/.json", json={"ok": {"x/y": 1}})  # only top-level keys are paths
    assert r.status_code == 400
    assert db.data == {"a": {"b": 1}}


def test_set_helper_follows_put_rules(db: FakeRealtimeDatabase) -> None:
    db.set("/l", ["a", None, "c"])
    assert db.data == {"l": {"0": "a", "2": "c"}}
    with pytest.raises(ValueError):
        db.set("x", {"bad.key": 1})
    with pytest.raises(ValueError):
        db.set("bad.path", 1)
    db.set("l", None)
    assert db.data is None


def test_data_property_is_a_deep_copy(db: FakeRealtimeDatabase) -> None:
    db.set("a", {"b": {"c": 1}})
    snapshot = db.data
    snapshot["a"]["b"]["c"] = 99
    assert db.data == {"a": {"b": {"c": 1}}}


def test_unknown_query_parameter_is_400_and_queries_are_not_implemented(
    client: httpx2.Client,
) -> None:
    assert client.get("/a.json", params={"cachebust": "1"}).status_code == 400
    assert client.get("/a.json", params={"orderBy": '"$key"'}).status_code == 501


# -- auth ----------------------------------------------------------------------


@pytest.fixture
def locked() -> Iterator[FakeRealtimeDatabase]:
    with FakeRealtimeDatabase(auth_token="sekret") as server:
        server.set("a", 1)
        yield server


def test_locked_database_without_credentials_is_401_permission_denied(
    locked: FakeRealtimeDatabase,
) -> None:
    for method in ("GET", "PUT", "PATCH", "POST", "DELETE"):
        r = httpx2.request(method, f"{locked.url}/a.json", content=b"{}")
        assert r.status_code == 401
        assert error_of(r) == "Permission denied"
    assert locked.data == {"a": 1}


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"auth": "sekret"}, {}),
        ({"access_token": "sekret"}, {}),
        ({}, {"Authorization": "Bearer sekret"}),
    ],
)
def test_locked_database_accepts_each_credential_form(
    locked: FakeRealtimeDatabase, params: dict[str, str], headers: dict[str, str]
) -> None:
    r = httpx2.get(f"{locked.url}/a.json", params=params, headers=headers)
    assert r.status_code == 200 and r.json() == 1


def test_wrong_credentials_are_401_with_the_real_messages(locked: FakeRealtimeDatabase) -> None:
    r = httpx2.get(f"{locked.url}/a.json", params={"auth": "wrong"})
    assert r.status_code == 401 and error_of(r) == "Could not parse auth token."
    r = httpx2.get(f"{locked.url}/a.json", params={"access_token": "wrong"})
    assert r.status_code == 401 and error_of(r) == "Unauthorized request."
    r = httpx2.get(f"{locked.url}/a.json", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error_of(r) == "Unauthorized request."


def test_error_body_has_the_real_layout(locked: FakeRealtimeDatabase) -> None:
    r = httpx2.get(f"{locked.url}/a.json")
    assert r.content == b'{\n  "error" : "Permission denied"\n}\n'  # 36 bytes, like the real one


# -- scripting: failures, hooks, recording ------------------------------


def test_fail_next_answers_scripted_status_then_recovers(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.fail_next(503, count=2)
    assert client.put("/a.json", json=1).status_code == 503
    r = client.put("/a.json", json=1)
    assert r.status_code == 503 and error_of(r) == "Service Unavailable"
    assert db.data is None  # failures are answered instead of processing
    assert client.put("/a.json", json=1).status_code == 200
    assert db.data == {"a": 1}


def test_fail_next_filters_by_method_and_path(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.fail_next(500, method="put", path="target")
    assert client.get("/target.json").status_code == 200
    assert client.put("/other.json", json=1).status_code == 200
    assert client.put("/target.json", json=1).status_code == 500
    assert client.put("/target.json", json=1).status_code == 200


def test_fail_next_custom_body_and_auth_style_failure(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.fail_next(401, body={"error": "Auth token is expired"})
    r = client.get("/a.json")
    assert r.status_code == 401 and r.json() == {"error": "Auth token is expired"}


def test_fail_next_status_zero_drops_the_connection(client: httpx2.Client, db: FakeRealtimeDatabase) -> None:
    db.fail_next(0, method="PUT")
    with pytest.raises(httpx2.TransportError):
        client.put("/a.json", json=1)
    assert db.data is None
    assert client.put("/a.json", json=1).status_code == 200


def test_requests_are_recorded_with_query_lowercased_headers_body_and_status(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    client.put("/a/b.json", json={"x": 1}, params={"print": "silent"}, headers={"X-Custom": "V"})
    client.get("/missing.json")
    first, second = db.requests
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path, first.query) == ("PUT", "/a/b.json", {"print": "silent"})
    assert first.headers["x-custom"] == "V"
    assert first.json() == {"x": 1} and json.loads(first.body) == {"x": 1}
    assert first.status == 204
    assert (second.method, second.status, second.body) == ("GET", 200, b"")


def test_on_request_hook_can_edit_data_between_get_and_conditional_put(
    client: httpx2.Client, db: FakeRealtimeDatabase
) -> None:
    db.set("rows/r1", {"status": "pending"})
    edited: list[bool] = []

    @db.on_request
    def reviewer(request: RecordedRequest) -> None:
        if request.method == "PUT" and "if-match" in request.headers and not edited:
            edited.append(True)
            db.set("rows/r1/status", "rejected")

    got = client.get("/rows/r1.json", headers=ETAG_ON)
    r = client.put("/rows/r1.json", json={"status": "done"}, headers={"if-match": got.headers["etag"]})
    assert r.status_code == 412
    assert r.json() == {"status": "rejected"}
    assert db.get_rendered("rows/r1") == {"status": "rejected"}
    retry = client.put("/rows/r1.json", json={"status": "done"}, headers={"if-match": r.headers["etag"]})
    assert retry.status_code == 200
    assert db.get_rendered("rows/r1") == {"status": "done"}
