"""After start-keystone.sh: projects, users, roles and the image endpoints of a small cloud.
   (source BASE/env.sh of keystone first)   python ks-setup.py IMAGE_URL
Run with the glance venv's python (openstacksdk). Idempotent. Creates:
  project service: user glance (admin, service: keystonemiddleware's own user),
                   user cachenode (service, member, reader: the sidecar's own identity; member
                   and reader so it may download the public and community images it warms)
                   + an application credential
  project projA:   alice (member, reader), rita (reader only: may see, may not download)
  project projB:   bob (member, reader)
Passwords: <user>pass. Prints the application credential as APP_CRED_ID=... APP_CRED_SECRET=..."""

import sys

import openstack

image_url = sys.argv[1]
conn = openstack.connect(load_yaml_config=False, load_envvars=True)
idn = conn.identity


def one(find, create, name, **kw):
    return find(name, ignore_missing=True) or create(name=name, **kw)


dom = idn.find_domain("default")
roles = {
    r: one(idn.find_role, idn.create_role, r) for r in ("admin", "member", "reader", "service")
}
projects = {
    p: one(idn.find_project, idn.create_project, p, domain_id=dom.id)
    for p in ("service", "projA", "projB")
}
grants = {
    "glance": ("service", ["admin", "service"]),
    "cachenode": ("service", ["service", "member", "reader"]),
    "alice": ("projA", ["member", "reader"]),
    "rita": ("projA", ["reader"]),
    "bob": ("projB", ["member", "reader"]),
}
users = {}
for name, (proj, rs) in grants.items():
    users[name] = one(
        idn.find_user,
        idn.create_user,
        name,
        domain_id=dom.id,
        password=f"{name}pass",
        default_project_id=projects[proj].id,
    )
    for r in rs:
        idn.assign_project_role_to_user(projects[proj], users[name], roles[r])
svc = idn.find_service("image", ignore_missing=True) or idn.create_service(
    name="glance", type="image"
)
have = {e.interface for e in idn.endpoints(service_id=svc.id)}
for itf in ("public", "internal", "admin"):
    if itf not in have:
        idn.create_endpoint(service_id=svc.id, interface=itf, url=image_url, region_id="RegionOne")
# An application credential belongs to its user and is created with that user's own token.
me = openstack.connect(
    auth_url=conn.auth["auth_url"],
    username="cachenode",
    password="cachenodepass",
    project_name="service",
    user_domain_id="default",
    project_domain_id="default",
    load_yaml_config=False,
    load_envvars=False,
)
uid = me.current_user_id
for old in me.identity.application_credentials(user=uid):
    if old.name == "cachenode-sidecar":
        me.identity.delete_application_credential(uid, old)
cred = me.identity.create_application_credential(uid, name="cachenode-sidecar")
print(f"APP_CRED_ID={cred.id} APP_CRED_SECRET={cred.secret}")
