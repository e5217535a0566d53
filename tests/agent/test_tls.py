"""TLS on the device side: the agent pins the CA of its config for HTTPS (enrollment, check-in, the TUF
repository, downloads) and for MQTT, and refuses plain HTTP/MQTT to anything but loopback unless told.

The server is the real one over HTTPS (a local CA from ``edgepack tls init``), the broker a real mosquitto
with a TLS listener; the impostor is the same server seen through another CA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bundles.keys import KeyStore
from device_agent.clock import SystemClock
from device_agent.config import config_from_dict
from device_agent.connection import http_transport, mqtt_settings
from device_agent.errors import ConfigError, TransportError
from device_agent.fetcher import DeadlineFetcher
from device_agent.server import ServerClient
from device_agent.telemetry import MqttPublisher
from edgepack import tls
from tests.agent.conftest import HARDWARE, toml_dumps

pytest.importorskip("fastapi")


def _config(tmp_path: Path, keys: KeyStore, url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"device_id": "kiosk-tls", "hardware_id": HARDWARE, "state_dir": str(tmp_path / "state"),
                           "server": {"url": url, "poll_interval_s": 2},
                           "trust": {"image_root": str(keys.root_path), "director_root": str(keys.director_root_path)}}
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return doc


def _enroll(tmp_path: Path, doc: dict[str, Any], token: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.toml"
    path.write_text(toml_dumps(doc))
    return subprocess.run([sys.executable, "-m", "device_agent.cli", "enroll", "--config", str(path), "--token",
                           token], capture_output=True, text=True, timeout=60)


@pytest.mark.mqtt
def test_agent_pinned_to_another_ca_refuses_the_server_and_the_broker(keys: KeyStore, tmp_path: Path,
                                                                      private_broker: Any) -> None:
    from tests.server.conftest import enrollment_token, start_server

    live = start_server(keys=keys, data_dir=tmp_path / "server", db_url=f"sqlite:///{tmp_path / 'server.db'}",
                        broker=private_broker, tls_files=private_broker.tls_files)
    impostor_ca = tls.init(tmp_path / "other-ca", hosts=["127.0.0.1", "localhost"]).ca_cert
    try:
        token = enrollment_token(live, uses=1)
        wrong = _config(tmp_path, keys, live.url, server={"ca_file": str(impostor_ca)})
        refused = _enroll(tmp_path, wrong, token)
        assert refused.returncode == 1, refused.stderr
        assert "tls:" in refused.stderr and "does not verify against the CA pinned in" in refused.stderr
        with live.admin as admin:  # nothing reached the server
            assert admin.get("/api/v1/devices/kiosk-tls").status_code == 404
        right = _config(tmp_path, keys, live.url, server={"ca_file": str(live.ca_file)})
        done = _enroll(tmp_path, right, token)
        assert done.returncode == 0, done.stderr

        # the enrolled device, configured with the wrong CA: every HTTPS path of the agent refuses
        config = config_from_dict(wrong)
        transport = http_transport(config)
        credential = (tmp_path / "state" / "credential").read_text().strip()
        with pytest.raises(TransportError) as err:
            ServerClient(live.url, transport).checkin("kiosk-tls", credential, {"state": "idle"})
        assert err.value.code == "tls"
        from tuf.api.exceptions import DownloadError

        with pytest.raises(DownloadError, match="does not verify"):
            list(DeadlineFetcher(transport, SystemClock()).fetch(f"{live.url}/tuf/image/timestamp.json"))
        ok = ServerClient(live.url, http_transport(config_from_dict(right))).checkin("kiosk-tls", credential,
                                                                                    {"state": "idle"})
        assert ok.poll_interval_s is not None

        # MQTT: the broker's certificate is checked against [mqtt] ca_file (default: [server] ca_file)
        import json
        import ssl

        enrollment = json.loads((tmp_path / "state" / "enrollment.json").read_text())
        assert enrollment["mqtt"]["url"].startswith("mqtts://") and "password" not in enrollment["mqtt"]
        for doc, ok_tls in ((wrong, False), (right, True)):
            m = mqtt_settings(config_from_dict(doc), enrollment)
            assert m is not None and m.username == enrollment["mqtt"]["username"] and m.password
            publisher = MqttPublisher(m.url, "kiosk-tls", username=m.username, password=m.password,
                                      ca_file=m.ca_file, client_id=m.client_id)
            if ok_tls:
                assert publisher.client.connect(publisher.host, publisher.port) == 0
                publisher.client.disconnect()
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    publisher.client.connect(publisher.host, publisher.port)
    finally:
        live.stop()


def test_plain_http_and_mqtt_only_to_loopback(keys: KeyStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"refusing plain http:// to updates.example.com .*allow_plain"):
        config_from_dict(_config(tmp_path, keys, "http://updates.example.com:8080"))
    with pytest.raises(ConfigError, match=r"refusing plain http:// to 10\.1\.2\.3"):
        config_from_dict(_config(tmp_path, keys, "http://10.1.2.3:8080"))
    allowed = config_from_dict(_config(tmp_path, keys, "http://10.1.2.3:8080", server={"allow_plain": True}))
    assert allowed.server.allow_plain
    assert config_from_dict(_config(tmp_path, keys, "https://updates.example.com")).server.url
    assert config_from_dict(_config(tmp_path, keys, "http://127.0.0.1:8080")).server.url  # development
    assert config_from_dict(_config(tmp_path, keys, "http://[::1]:8080")).server.url
    with pytest.raises(ConfigError, match="must be true or false"):
        config_from_dict(_config(tmp_path, keys, "https://u", server={"allow_plain": "yes"}))
    with pytest.raises(ConfigError, match=r"\[mqtt\] url: refusing plain mqtt://"):
        config_from_dict(_config(tmp_path, keys, "https://u", mqtt={"url": "mqtt://broker.example.com:1883"}))
    # the broker URL the server handed out at enrollment is held to the same rule
    config = config_from_dict(_config(tmp_path, keys, "https://u"))
    with pytest.raises(ConfigError, match=r"broker url: refusing plain mqtt:// to 10\.9\.8\.7"):
        mqtt_settings(config, {"mqtt": {"url": "mqtt://10.9.8.7:1883", "username": "u"}})
    local = mqtt_settings(config_from_dict(_config(tmp_path, keys, "https://u", mqtt={"password": "p"})),
                          {"mqtt": {"url": "mqtt://127.0.0.1:1883", "username": "u", "client_id": "edgepack-dev-x"}})
    assert local is not None and local.client_id == "edgepack-dev-x" and local.password == "p"
