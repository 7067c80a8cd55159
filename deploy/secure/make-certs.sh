#!/bin/sh
# The secured profile's throw-away CA, server and client certificates and passwords, made once
# into the `secure-certs` volume (compose.yaml, profile "secure"). Delete the volume to make new ones.
set -eu
cd /certs
[ -f done ] && exit 0
apk add --no-cache openssl >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 365 -subj "/CN=PortPulse compose CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
leaf() {  # name, CN, extensions
  printf '%b' "$3" > "$1.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days 365 -extfile "$1.ext"
}
leaf server localhost \
  "subjectAltName=DNS:localhost,DNS:mosquitto-secure,DNS:kafka-secure,DNS:influxdb-secure,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
leaf bridge portpulse-bridge "extendedKeyUsage=clientAuth\n"
cat server.key server.pem > kafka-keystore.pem
for name in gateway kafka influx ops; do openssl rand -hex 16 > "$name.password"; done
# the services' users read these files; mode 644 inside a volume only compose's services mount
chmod 644 ./*
touch done
