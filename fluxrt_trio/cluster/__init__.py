"""Several nodes over Redis: the wire format of the bus (`wire`), every node's replicated state (`view`), the
connection to Redis (`engine`) and the hub that puts them behind the `Hub` interface (`hub`)."""
