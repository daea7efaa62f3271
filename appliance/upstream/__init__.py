"""Other OpenAI-compatible servers whose models this daemon serves too (`[upstreams.NAME]`)."""

from appliance.upstream.pool import Upstream, UpstreamPool

__all__ = ["Upstream", "UpstreamPool"]
