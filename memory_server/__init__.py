"""PCCNet's colour memory as a durable ZeroMQ service (wire protocol: ../shared/docs/PROTOCOL.md).

Client side: `client.MemoryClient`, `launcher.start_server`, `local.InProcessMemory`. Server side:
`cli` (flags) -> `server` (ROUTER loop) -> `engine` (validation, ops) -> `store` + `rules` + `backends`
(state, update rule, exact search) and `durability` + `wal` + `snapshot` (crash safety). Importing the
package imports nothing heavy; faiss and torch load only when a search backend is built.
"""
