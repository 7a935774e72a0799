"""The registration authority: authorization, policy, one transaction per operation, audit.

Every public function here takes a :class:`~fleettrust.services.context.ServiceContext` and the
:class:`~fleettrust.services.auth.Principal` acting, checks what that principal may do, runs the
operation in one database transaction and writes its audit event(s) in that same transaction.
"""
