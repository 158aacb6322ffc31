"""Property-based tests of the server's error paths: schemathesis generates requests from the server's own
OpenAPI schema (valid and invalid ones) and sends them in-process; no request may produce a 5xx."""
import schemathesis
from hypothesis import HealthCheck, settings

from conftest import random_model, small_v3
from dsv3 import Engine, EngineConfig, ModelConfig
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.serve.app import ServerConfig, create_app


def capped_app():
    """A server capped for tests: 96-token context, n <= 2, one path prefix."""
    tok = train_bpe(list(read_documents(None))[:10], 512)
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(vocab_size=576),
                                    "max_position_embeddings": 96, "num_nextn_predict_layers": 0})
    engine = Engine(random_model(cfg), tok, EngineConfig(block_size=16, num_blocks=64))
    return create_app(engine, ServerConfig(model_name="tiny", max_n=2, prefixes=("/v1",)))


schema = schemathesis.openapi.from_asgi("/openapi.json", capped_app())
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_is_a_server_error(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"  # the served name, so that valid requests reach the engine
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if response.status_code == 422:
            assert error["param"], error
