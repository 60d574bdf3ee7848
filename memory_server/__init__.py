"""memory_server"""
